"""`runnerd run-step` as a step author's local loop (issue 14): --env, the event file, the
readable summary on a terminal and JSON when piped, --watch; exec steps naming the limit or
policy their program ran into. End to end, through the real command."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.conftest import run_step_file, runnerd_argv, runnerd_env

FAILING = (
    "def shape(order):\n"
    "    return {'id': order['id'], 'total': order['price'] * order['quantity']}\n"
    "\n"
    "def run(input, ctx):\n"
    "    ctx.log.info(f\"{len(input['orders'])} orders\")\n"
    "    return [shape(order) for order in input['orders']]\n"
)
EVENT = {"orders": [{"id": 1, "price": 5, "quantity": 2}, {"id": 2, "price": 3}]}


def run_step_command(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        runnerd_argv("full", "run-step", *args),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=runnerd_env(),
    )


def test_env_and_the_event_file(tmp_path: Path) -> None:
    step = tmp_path / "greet.py"
    step.write_text(
        "import os\n"
        "def run(event, ctx):\n"
        "    return {'greeting': f\"{os.environ['GREETING']}, {event['name']}\",\n"
        "            'empty': os.environ['EMPTY'], 'has_equals': os.environ['URL']}\n"
    )
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"name": "Ada"}))

    result = run_step_file(
        "full",
        step,
        "--input",
        f"@{event}",
        "--env",
        "GREETING=Hello",
        "--env",
        "EMPTY=",
        "--env",
        "URL=https://x.test/?a=b",
    )

    assert result.exit_code == 0, result.report
    assert result.output == {
        "greeting": "Hello, Ada",
        "empty": "",
        "has_equals": "https://x.test/?a=b",
    }


def test_a_malformed_env_flag_is_one_line(tmp_path: Path) -> None:
    step = tmp_path / "s.py"
    step.write_text("def run(input, ctx):\n    return 1\n")

    done = run_step_command(str(step), "--env", "NOVALUE")

    assert done.returncode == 2
    assert done.stderr == "runnerd: --env needs KEY=VALUE, got 'NOVALUE'\n"


def test_pretty_shows_status_error_with_source_line_and_logs(tmp_path: Path) -> None:
    step = tmp_path / "orders.py"
    step.write_text(FAILING)
    event = tmp_path / "event.json"
    event.write_text(json.dumps(EVENT))

    done = run_step_command(str(step), "--input", f"@{event}", "--pretty")

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("orders.py: failed (exception) after ")
    assert lines[1] == "error:"
    assert lines[2] == "  KeyError: 'quantity'"
    assert '    File "orders.py", line 2, in shape' in lines
    source = lines.index('    File "orders.py", line 2, in shape') + 1
    assert lines[source].strip().startswith("return {'id': order['id'], 'total':")
    assert "logs (1):" in lines
    assert "  INFO 2 orders" in lines


def test_pretty_on_a_terminal_json_when_piped(tmp_path: Path) -> None:
    step = tmp_path / "ok.py"
    step.write_text("def run(input, ctx):\n    return {'doubled': input * 2}\n")

    piped = run_step_command(str(step), "--input", "21")
    assert json.loads(piped.stdout)["output"] == {"doubled": 42}

    on_terminal = _on_a_terminal(runnerd_argv("full", "run-step", str(step), "--input", "21"))
    assert on_terminal.splitlines()[0].startswith("ok.py: succeeded in ")
    assert '"doubled": 42' in on_terminal

    forced = _on_a_terminal(runnerd_argv("full", "run-step", str(step), "--input", "1", "--json"))
    assert json.loads(forced)["ok"] is True


def _on_a_terminal(argv: list[str]) -> str:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            argv, stdout=terminal, stderr=subprocess.PIPE, env=runnerd_env(), close_fds=True
        )
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(60) in (0, 1)
    finally:
        os.close(controller)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_watch_runs_again_on_change_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    step = tmp_path / "watched.py"
    step.write_text("def run(input, ctx):\n    return 'first'\n")
    event = tmp_path / "event.json"
    event.write_text("1")
    out = tmp_path / "out.jsonl"
    with out.open("w") as stdout:
        process = subprocess.Popen(
            runnerd_argv("full", "run-step", str(step), "--input", f"@{event}", "--watch"),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=runnerd_env(),
            start_new_session=True,  # its own group, as a terminal's foreground job has
        )
    try:
        reports = _wait_for_reports(out, 1)
        assert reports[0]["output"] == "first"

        time.sleep(0.05)  # a later mtime than the first run's file, on any filesystem
        step.write_text("def run(input, ctx):\n    return ['second', input]\n")
        reports = _wait_for_reports(out, 2)
        assert reports[1]["output"] == ["second", 1]

        event.write_text("2")  # the event file is watched too
        reports = _wait_for_reports(out, 3)
        assert reports[2]["output"] == ["second", 2]

        family = [process.pid, *(child.pid for child in psutil.Process(process.pid).children())]
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group gets it
        stderr = process.communicate(timeout=30)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "watching" in stderr
    time.sleep(0.5)
    assert [pid for pid in family if psutil.pid_exists(pid)] == []  # the zygote went too


def _wait_for_reports(path: Path, count: int, timeout_s: float = 60) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} runs after {timeout_s} s: {path.read_text()!r}")


def test_watch_needs_a_step_file() -> None:
    done = run_step_command("--exec", "--watch", "--", "true")

    assert done.returncode == 2
    assert done.stderr == "runnerd: --watch needs a step file to watch\n"


def test_an_exec_step_without_network_says_so(profile: str, tmp_path: Path) -> None:
    script = "import socket; socket.create_connection(('127.0.0.1', 6379), timeout=2)"
    done = subprocess.run(
        runnerd_argv(profile, "run-step", "--exec", "--", "python3", "-c", script),
        capture_output=True,
        text=True,
        timeout=60,
        env=runnerd_env(),
    )

    report = json.loads(done.stdout)
    assert report["error"]["type"] == "exception"
    assert report["error"]["message"].startswith("network is off for this step (the program")
    assert "PermissionError" in report["stderr"]  # what it printed is kept as it was


def test_an_exec_step_past_the_pids_limit_says_so(profile: str) -> None:
    script = "import subprocess\nfor _ in range(40): subprocess.Popen(['sleep', '5'])"
    done = subprocess.run(
        runnerd_argv(profile, "run-step", "--exec", "--pids", "16", "--", "python3", "-c", script),
        capture_output=True,
        text=True,
        timeout=60,
        env=runnerd_env(),
    )

    report = json.loads(done.stdout)
    assert report["error"]["message"].startswith("pids limit of 16 reached (the program")


def test_an_exec_step_keeps_stderr_written_before_its_timeout(profile: str) -> None:
    done = subprocess.run(
        runnerd_argv(
            profile, "run-step", "--exec", "--wall-s", "2", "--", "sh", "-c", "echo 1 >&2; sleep 30"
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env=runnerd_env(),
    )

    report = json.loads(done.stdout)
    assert report["error"]["type"] == "timeout"
    assert report["stderr"] == "1\n"
