"""Shared test helpers: run `runnerd run-step` for real, under the host's full profile or the
reproduced Fargate profile (tests/fargate_profile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FARGATE_LAUNCHER = ROOT / "tests" / "fargate_profile.py"
PROFILES = ("full", "fargate")


@dataclass
class StepRun:
    exit_code: int
    report: dict[str, Any]
    stderr: str

    @property
    def error_type(self) -> str | None:
        error = self.report.get("error")
        return error["type"] if error else None

    @property
    def output(self) -> Any:
        return self.report.get("output")


def runnerd_argv(profile: str, *args: str) -> list[str]:
    argv = [sys.executable, "-m", "runnerd", *args]
    if profile == "fargate":
        return [sys.executable, str(FARGATE_LAUNCHER), *argv]
    return argv


def runnerd_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_step_file(
    profile: str, path: Path, *args: str, timeout_s: float = 60, env: dict[str, str] | None = None
) -> StepRun:
    argv = runnerd_argv(profile, "run-step", str(path), *args)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout_s, env=env or runnerd_env()
    )
    try:
        report = json.loads(done.stdout) if done.stdout.strip() else {}
    except json.JSONDecodeError:
        pytest.fail(f"run-step printed no JSON: {done.stdout!r} / {done.stderr!r}")
    return StepRun(done.returncode, report, done.stderr)


def doctor_report(profile: str, **env: str) -> dict[str, Any]:
    """`runnerd doctor`'s JSON under the profile, with these variables added to the caller's
    environment."""
    done = subprocess.run(
        runnerd_argv(profile, "doctor"),
        capture_output=True,
        text=True,
        timeout=120,
        env=runnerd_env(**env),
    )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> str:
    """Each test using this runs under the full host profile and the Fargate profile."""
    if request.param == "fargate" and os.geteuid() != 0:
        pytest.skip("the Fargate profile launcher needs root")
    return str(request.param)


@pytest.fixture
def run_step(tmp_path: Path, profile: str):  # type: ignore[no-untyped-def]
    """run_step(source, *flags, suffix=".py") -> StepRun, under the current profile."""

    def run(source: str, *args: str, suffix: str = ".py", timeout_s: float = 60) -> StepRun:
        path = tmp_path / f"step{suffix}"
        path.write_text(source)
        return run_step_file(profile, path, *args, timeout_s=timeout_s)

    return run
