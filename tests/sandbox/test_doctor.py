"""`runnerd doctor`: the probe's findings as JSON, and the exit status for required layers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from sandbox.layers import ALL_LAYERS
from tests.conftest import runnerd_argv, runnerd_env

NAMESPACES = ("userns", "pidns", "netns", "mountns", "ipcns", "utsns")
FALLBACK = ("uid_drop", "rlimits", "no_new_privs", "seccomp", "close_fds", "clean_env")


def _doctor(profile: str, **env: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    done = subprocess.run(
        runnerd_argv(profile, "doctor"),
        capture_output=True,
        text=True,
        timeout=60,
        env=runnerd_env(**env),
    )
    return done.returncode, json.loads(done.stdout)


def test_full_profile_has_every_layer() -> None:
    code, report = _doctor("full")
    assert set(report["layers"]) == set(ALL_LAYERS)
    missing = [name for name, status in report["layers"].items() if not status["ok"]]
    assert missing == [], report
    assert code == 0


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the Fargate launcher needs root")


@needs_root
def test_fargate_profile_loses_namespaces_and_cgroups_keeps_the_fallback() -> None:
    code, report = _doctor("fargate")
    layers = report["layers"]
    for name in NAMESPACES + ("cgroup_memory", "cgroup_pids", "private_proc"):
        assert layers[name]["ok"] is False, name
        assert layers[name]["reason"], name
    for name in FALLBACK:
        assert layers[name]["ok"] is True, name
    assert code == 0  # the default required set is the fallback set


@needs_root
def test_missing_required_layer_fails_doctor_and_strict_run_step(tmp_path) -> None:
    code, report = _doctor("fargate", RUNNERD_SANDBOX_REQUIRE="seccomp,netns")
    assert code == 1
    assert report["missing_required"] == ["netns"]
    step = tmp_path / "s.py"
    step.write_text("def run(i, c): return 1\n")
    done = subprocess.run(
        runnerd_argv("fargate", "run-step", str(step)),
        capture_output=True,
        text=True,
        timeout=60,
        env=runnerd_env(RUNNERD_SANDBOX_REQUIRE="netns", RUNNERD_SANDBOX_MODE="strict"),
    )
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["error"]["type"] == "sandbox"
    assert "netns" in result["error"]["message"]
    best_effort = subprocess.run(
        runnerd_argv("fargate", "run-step", str(step)),
        capture_output=True,
        text=True,
        timeout=60,
        env=runnerd_env(RUNNERD_SANDBOX_REQUIRE="netns"),
    )
    assert best_effort.returncode == 0
    assert "netns" in best_effort.stderr  # says so
