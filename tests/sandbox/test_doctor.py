"""`runnerd doctor`: the probe's findings as JSON, and the exit status for required layers and
for problems (a node the step uids cannot execute, or none); the demo on such a host says why."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from sandbox.layers import ALL_LAYERS
from tests.conftest import ROOT, runnerd_argv, runnerd_env

NAMESPACES = ("userns", "pidns", "netns", "mountns", "ipcns", "utsns")
FALLBACK = ("uid_drop", "rlimits", "no_new_privs", "seccomp", "close_fds", "clean_env")


def _doctor(profile: str, **env: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    done = _doctor_run(profile, **env)
    return done.returncode, json.loads(done.stdout)


def _doctor_run(profile: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        runnerd_argv(profile, "doctor"),
        capture_output=True,
        text=True,
        timeout=60,
        env=runnerd_env(**env),
    )


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


def test_node_the_step_uids_cannot_execute_fails_doctor(profile: str, hidden_node: Path) -> None:
    done = _doctor_run(profile, RUNNERD_NODE_PATH=str(hidden_node))

    if profile == "full":
        # The filesystem view binds node at its own path, behind directories of its own.
        assert done.returncode == 0, done.stdout
        assert json.loads(done.stdout)["problems"] == []
        return
    assert done.returncode == 1, done.stdout
    report = json.loads(done.stdout)
    assert report["node"] == str(hidden_node)
    assert report["layers"]["uid_drop"]["ok"]  # the check is made as a slot uid
    (problem,) = [p for p in report["problems"] if str(hidden_node) in p]
    assert f"cannot execute node at {hidden_node}" in problem
    assert f"{hidden_node.parent} (mode 0700, owner uid 0) does not let other users in" in problem
    assert f"chmod o+x {hidden_node.parent}" in problem and "RUNNERD_NODE_PATH" in problem
    assert f"runnerd: problem: {problem}" in done.stderr.splitlines()


def test_missing_node_fails_doctor(profile: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-node-here"
    done = _doctor_run(profile, RUNNERD_NODE_PATH=str(missing))

    assert done.returncode == 1, done.stdout
    problems = json.loads(done.stdout)["problems"]
    assert any(f"node was set to {missing}, which is not a file" in p for p in problems), problems
    assert all("RUNNERD_NODE_PATH" in p for p in problems if "node" in p)


def test_node_not_on_path_fails_doctor(tmp_path: Path) -> None:
    done = _doctor_run("full", PATH=str(tmp_path))  # an empty directory: no node on PATH

    assert done.returncode == 1, done.stdout
    report = json.loads(done.stdout)
    assert report["node"] is None
    assert any("node was not found on PATH" in p for p in report["problems"]), report


def test_demo_on_a_host_steps_cannot_use_says_why_and_times_nothing(hidden_node: Path) -> None:
    # Under the Fargate profile: with a filesystem view the hidden node would be reachable;
    # and with a node per step, not forked from the node zygote (root's), which can run it.
    process = subprocess.Popen(
        runnerd_argv("fargate", "demo", "--runs", "5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=runnerd_env(RUNNERD_NODE_PATH=str(hidden_node), RUNNERD_NODE_FORK="false"),
        start_new_session=True,  # its embedded redis-server and zygote go with it below
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert process.returncode == 1, stdout + stderr
    assert "FAILED (sandbox)" in stdout
    (message,) = [line.strip() for line in stdout.splitlines() if "closed its channel" in line]
    assert f"cannot execute node at {hidden_node}" in message  # the reason, under the step
    assert "more runs" not in stdout  # no timings of a failure
    assert f"runnerd: demo: step 'poison' failed, so no timed runs: {message}" in stderr
