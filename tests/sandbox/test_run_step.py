"""`runnerd run-step` end to end: the three runtimes, the report, exit codes, usage errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_step_file, runnerd_argv, runnerd_env


def test_python_step_gets_input_ctx_and_returns_output(run_step) -> None:
    result = run_step(
        "def run(input, ctx):\n"
        "    print('to stdout')\n"
        "    ctx.log.info('logged')\n"
        "    return {'n': input['n'] + 1, 'step': ctx.step, 'attempt': ctx.attempt,\n"
        "            'tmpdir': ctx.tmpdir, 'raw': b'\\x00\\x01'}\n",
        "--input",
        '{"n": 41}',
    )
    assert result.exit_code == 0, result.report
    assert result.report["ok"] is True
    assert result.output["n"] == 42
    assert result.output["attempt"] == 1
    assert result.output["raw"] == "AAE="  # bytes survive, shown as base64 in JSON
    assert result.report["stdout"] == "to stdout\n"
    assert result.report["logs"] == ["INFO logged"]
    assert {"seccomp", "rlimits", "no_new_privs", "uid_drop"} <= set(result.report["layers"])


def test_async_python_step(run_step) -> None:
    result = run_step(
        "import asyncio\n"
        "async def run(input, ctx):\n"
        "    await asyncio.sleep(0.01)\n"
        "    return input * 2\n",
        "--input",
        "21",
    )
    assert result.exit_code == 0, result.report
    assert result.output == 42


def test_exception_is_reported_with_type_and_traceback(run_step) -> None:
    result = run_step("def run(input, ctx):\n    raise ValueError('bad input')\n")
    assert result.exit_code == 1
    assert result.error_type == "exception"
    assert result.report["error"]["message"].startswith("ValueError: bad input")
    assert "line 2" in result.report["error"]["message"]


def test_step_without_run_function(run_step) -> None:
    result = run_step("x = 1\n")
    assert result.exit_code == 1
    assert result.error_type == "exception"
    assert "run(input, ctx)" in result.report["error"]["message"]


def test_unserializable_output(run_step) -> None:
    result = run_step("def run(input, ctx):\n    return object()\n")
    assert result.error_type == "exception"
    assert "msgpack" in result.report["error"]["message"]


def test_javascript_module_step(run_step) -> None:
    result = run_step(
        "export async function run(input, ctx) {\n"
        "  console.log('js says hi');\n"
        "  ctx.log.info('from', ctx.step);\n"
        "  return { doubled: input.n * 2, bytes: new Uint8Array([1, 2]), neg: -7, big: 2 ** 40 };\n"
        "}\n",
        "--input",
        '{"n": 21}',
        suffix=".mjs",
    )
    assert result.exit_code == 0, result.report
    assert result.output == {"doubled": 42, "bytes": "AQI=", "neg": -7, "big": 2**40}
    assert result.report["stdout"] == "js says hi\n"


def test_javascript_commonjs_step(run_step) -> None:
    result = run_step(
        "module.exports.run = (input) => ({ got: input });\n", "--input", "[1]", suffix=".js"
    )
    assert result.exit_code == 0, result.report
    assert result.output == {"got": [1]}


def test_javascript_exception(run_step) -> None:
    result = run_step("export function run() { throw new TypeError('nope'); }\n", suffix=".mjs")
    assert result.exit_code == 1
    assert result.error_type == "exception"
    assert "\n\nTypeError: nope" in result.report["error"]["message"]


def test_exec_step_json_in_and_out(profile) -> None:
    program = "import json, sys; print(json.dumps({'echo': json.load(sys.stdin)}))"
    argv = runnerd_argv(
        profile,
        "run-step",
        "--exec",
        "--input",
        '{"x": 1}',
        "--",
        "/usr/bin/python3",
        "-c",
        program,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=runnerd_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"output":{"echo":{"x":1}}' in done.stdout


def test_exec_step_failing_program(profile) -> None:
    argv = runnerd_argv(
        profile, "run-step", "--exec", "--", "/bin/sh", "-c", "echo oops >&2; exit 3"
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=runnerd_env())
    assert done.returncode == 1
    assert "exited with status 3" in done.stdout
    assert "oops" in done.stdout  # its stderr is in the report


@pytest.mark.parametrize(
    "script", ["echo 'not json, but said'", "echo 'not json, but said'; exit 4"]
)
def test_exec_step_output_that_is_not_the_result_stays_visible(profile, script) -> None:
    argv = runnerd_argv(profile, "run-step", "--exec", "--", "/bin/sh", "-c", script)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=runnerd_env())
    report = json.loads(done.stdout)

    assert done.returncode == 1
    assert report["error"]["type"] == "exception"
    assert report["stdout"] == "not json, but said\n"  # was "", hiding what it printed


def test_exec_program_that_does_not_read_its_input(profile, tmp_path) -> None:
    """Writing 1 MB to a program that exits unread must fail as that program's exit, not kill
    the runtime with SIGPIPE."""
    data = tmp_path / "big.json"
    data.write_text('"' + "x" * 1_000_000 + '"')
    argv = runnerd_argv(
        profile, "run-step", "--exec", "--input", f"@{data}", "--", "/bin/sh", "-c", "exit 3"
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=runnerd_env())
    assert done.returncode == 1
    assert "exited with status 3" in done.stdout, done.stdout


def _runnerd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runnerd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=runnerd_env(**env),
        cwd=ROOT,
    )


def test_usage_errors_exit_2_with_one_line_and_no_traceback(tmp_path) -> None:
    step = tmp_path / "s.py"
    step.write_text("def run(i, c): return i\n")
    cases = [
        _runnerd("run-step", str(tmp_path / "missing.py")),
        _runnerd("run-step", str(tmp_path / "s.txt")),
        _runnerd("run-step", str(step), "--input", "{not json"),
        _runnerd("run-step", str(step), "--memory-mb", "lots"),
        _runnerd("run-step", "--exec"),
        _runnerd("run-step", str(step), RUNNERD_SANDBOX_SLOTS="many"),
        _runnerd("doctor", RUNNERD_SANDBOX_REQUIRE="seccomp,nonsense"),
    ]
    for done in cases:
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "RUNNERD_SANDBOX_SLOTS" in cases[5].stderr
    assert "nonsense" in cases[6].stderr


def test_input_from_file(tmp_path) -> None:
    step = tmp_path / "s.py"
    step.write_text("def run(i, c): return i['k']\n")
    data = tmp_path / "in.json"
    data.write_text('{"k": "from file"}')
    done = _runnerd("run-step", str(step), "--input", f"@{data}")
    assert done.returncode == 0, done.stderr
    assert '"output":"from file"' in done.stdout


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    """A directory under /tmp that the step uids may pass through (pytest's own is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="runnerd-install-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_runtime_installed_under_tmp_survives_the_private_tmp(world_readable_tmp: Path) -> None:
    """A checkout or venv under /tmp is bound back into the step's private /tmp (read-only):
    the node runner and the Python packages must not vanish under the tmpfs."""
    tmp_path = world_readable_tmp
    for package in ("sandbox", "runnerd"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    step = tmp_path / "step.mjs"
    step.write_text("export function run(input) { return input + 1; }\n")
    done = subprocess.run(
        [sys.executable, "-m", "runnerd", "run-step", str(step), "--input", "41"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=runnerd_env(PYTHONPATH=str(tmp_path)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"output":42' in done.stdout


NODE_STEP = "export function run(input) { return input; }\n"


def test_node_step_with_a_node_the_step_uids_cannot_execute_says_why(
    profile: str, tmp_path: Path, hidden_node: Path
) -> None:
    step = tmp_path / "step.mjs"
    step.write_text(NODE_STEP)
    # Forked from the node zygote (root's), a JS step never executes node itself.
    forked = run_step_file(profile, step, env=runnerd_env(RUNNERD_NODE_PATH=str(hidden_node)))
    assert forked.exit_code == 0, forked.report

    # A node per step is executed by the step's uid.
    env = runnerd_env(RUNNERD_NODE_PATH=str(hidden_node), RUNNERD_NODE_FORK="false")
    result = run_step_file(profile, step, env=env)
    if profile == "full":
        # The filesystem view binds node at its own path, behind directories of its own.
        assert result.exit_code == 0, result.report
        return
    assert result.exit_code == 1
    assert result.error_type == "sandbox", result.report
    message = result.report["error"]["message"]
    assert message.startswith("the child closed its channel before it was ready")
    assert f"cannot execute node at {hidden_node}" in message
    assert f"chmod o+x {hidden_node.parent}" in message and "RUNNERD_NODE_PATH" in message


def test_node_step_with_a_missing_node_says_why(profile: str, tmp_path: Path) -> None:
    step = tmp_path / "step.mjs"
    step.write_text(NODE_STEP)
    missing = "/nonexistent-runnerd-node/node"
    result = run_step_file(profile, step, env=runnerd_env(RUNNERD_NODE_PATH=missing))

    assert result.exit_code == 1
    assert result.error_type == "sandbox", result.report
    assert f"node was set to {missing}, which is not a file" in result.report["error"]["message"]
