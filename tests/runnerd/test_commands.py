"""`runnerd submit`, `serve` and `demo` as a user runs them: exit codes, stdout, one readable
line on stderr for a mistake."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, runnerd_env
from tests.runnerd.conftest import (
    SHARED_REDIS_URL,
    ServeFactory,
    free_port,
    run_async,
    wait_all,
    write_integration,
)

STEPS = {
    "add.py": "def run(input, ctx):\n    return {'n': input['n'] + 1}\n",
    "double.mjs": "export function run(input) { return { n: input.n * 2 }; }\n",
    "check.py": (
        "def run(input, ctx):\n"
        "    if input['n'] > 100:\n"
        "        raise ValueError('too big')\n"
        "    return input\n"
    ),
}
GOOD = {
    "name": "cli",
    "steps": [
        {"name": "add", "code": "add.py"},
        {"name": "double", "code": "double.mjs"},
        {"name": "check", "code": "check.py"},
    ],
}


def runnerd(*args: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "runnerd", *args]
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=runnerd_env(**env),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    finally:
        # Whatever it left behind (demo's embedded redis-server, a zygote) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.fixture
def submit(prefix: str, tmp_path: Path) -> Any:
    """submit(spec, *args) runs `runnerd submit` on an integration file written from spec."""

    def run(spec: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        path = write_integration(tmp_path / "integration", spec, STEPS)
        return runnerd(
            "submit", str(path), *args, REDIS_URL=SHARED_REDIS_URL, RUNNERD_KEY_PREFIX=prefix
        )

    return run


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_submit_wait_prints_the_result_and_exits_0(serve: ServeFactory, submit: Any) -> None:
    serve()
    done = submit(GOOD, "--input", '{"n": 4}', "--wait", "--timeout", "30")

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded"
    assert result["output"] == {"n": 10}
    assert result["error"] is None
    assert [step["name"] for step in result["steps"]] == ["add", "double", "check"]
    assert [step["output"] for step in result["steps"]] == [{"n": 5}, {"n": 10}, {"n": 10}]


def test_submit_wait_exits_1_on_a_failed_execution(serve: ServeFactory, submit: Any) -> None:
    serve()
    done = submit(GOOD, "--input", '{"n": 60}', "--wait")

    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "failed"
    assert result["failed_step"] == "check"
    assert result["error"]["type"] == "exception"
    assert "ValueError: too big" in result["error"]["message"]


def test_submit_without_wait_prints_the_execution_id(
    serve: ServeFactory, submit: Any, prefix: str
) -> None:
    serve()
    done = submit(GOOD, "--input", '{"n": 1}')

    assert done.returncode == 0, done.stderr
    execution_id = done.stdout.strip()
    assert re.fullmatch(r"0-[0-9a-f]{32}", execution_id)
    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id]))
    assert result.output == {"n": 4}


def test_result_of_a_submitted_execution(serve: ServeFactory, submit: Any, prefix: str) -> None:
    """Submitted without waiting, then looked up: no result while no worker runs (exit 3),
    the wait cut short by its timeout in one line (exit 3), then the result once a worker
    has run it, as submit --wait prints it (exit 0)."""
    env = {"REDIS_URL": SHARED_REDIS_URL, "RUNNERD_KEY_PREFIX": prefix}
    execution_id = submit(GOOD, "--input", '{"n": 1}').stdout.strip()

    pending = runnerd("result", execution_id, **env)
    assert pending.returncode == 3 and pending.stdout == ""
    assert "no result for " + execution_id in one_line(pending.stderr)
    timed_out = runnerd("result", execution_id, "--wait", "--timeout", "0.5", **env)
    assert timed_out.returncode == 3
    assert "nothing consumed the work stream" in one_line(timed_out.stderr)

    serve()
    waited = runnerd("result", execution_id, "--wait", "--timeout", "30", **env)
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["output"] == {"n": 4}
    again = runnerd("result", execution_id, **env)
    assert again.returncode == 0 and json.loads(again.stdout) == json.loads(waited.stdout)


def test_result_of_a_failed_execution_exits_1(
    serve: ServeFactory, submit: Any, prefix: str
) -> None:
    serve()
    execution_id = submit(GOOD, "--input", '{"n": 60}').stdout.strip()
    env = {"REDIS_URL": SHARED_REDIS_URL, "RUNNERD_KEY_PREFIX": prefix}
    done = runnerd("result", execution_id, "--wait", **env)

    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["failed_step"] == "check"


@pytest.mark.parametrize("args", [["not-an-id"], ["7-abc"], ["0-abc", "--timeout", "-1"]])
def test_result_usage_errors_exit_2_in_one_line(args: list[str], prefix: str) -> None:
    done = runnerd("result", *args, REDIS_URL=SHARED_REDIS_URL, RUNNERD_KEY_PREFIX=prefix)

    assert done.returncode == 2
    assert one_line(done.stderr).startswith("runnerd: ")


def both_code_and_exec(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "steps": [{"name": "x", "code": "add.py", "exec": ["true"]}]}


BAD_FILES = {
    "invalid JSON": (lambda spec: None, "integration.json: JSON is malformed"),
    "missing name": (
        lambda spec: {key: value for key, value in spec.items() if key != "name"},
        "`name`",
    ),
    "code and exec": (
        both_code_and_exec,
        "`$.steps[0]` needs exactly one of code, source, exec or for_each",
    ),
    "unreadable code": (
        lambda spec: {**spec, "steps": [{"name": "x", "code": "missing.py"}]},
        "`$.steps[0].code`: cannot read",
    ),
    "inline JavaScript without a runtime": (
        lambda spec: {
            **spec,
            "steps": [{"name": "js", "source": "export function run(input) { return input }"}],
        },
        "looks like JavaScript, and inline sources are Python unless they say otherwise: add "
        '"runtime": "node"',
    ),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_integration_file_exits_2_with_one_line(case: str, tmp_path: Path) -> None:
    make, expected = BAD_FILES[case]
    spec = make(GOOD)
    path = write_integration(tmp_path, spec if spec is not None else {}, STEPS)
    if spec is None:
        path.write_text('{"name": "broken", "steps": [}')

    done = runnerd("submit", str(path), REDIS_URL=SHARED_REDIS_URL)

    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("runnerd: ")
    assert expected in line
    assert done.stdout == ""


def test_serve_without_redis_says_so_in_one_line() -> None:
    done = runnerd("serve", timeout_s=30, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")

    assert done.returncode != 0
    line = one_line(done.stderr)
    assert "cannot reach Redis" in line


def test_demo_runs_six_steps_and_succeeds() -> None:
    done = runnerd("demo", "--runs", "0")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "6 steps" in lines[0]
    assert [line.split()[:2] for line in lines[1:7]] == [
        ["fetch", "ok"],
        ["poison", "ok"],
        ["transform", "ok"],
        ["enrich", "ok"],
        ["check", "ok"],
        ["summarize", "ok"],
    ]
    assert "status: succeeded" in lines
    output = json.loads(next(line for line in lines if line.startswith("output: "))[8:])
    assert output["isolated"] is True
