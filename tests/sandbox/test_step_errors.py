"""What the author of a failing Python step reads (issue 14): their file, line and source line,
the error once, no runtime frames; syntax errors with a caret; errors escaping a thread or an
asyncio task; `Fatal`; limits and policies named. Real children, both profiles."""

from __future__ import annotations

import time

from tests.conftest import StepRun

DEEP_BUG = (
    "def average(orders):\n"
    "    total = sum(order['n'] for order in orders)\n"
    "    return total / len([o for o in orders if o.get('paid')])\n"
    "\n"
    "\n"
    "def summarise(orders):\n"
    "    return {'average': average(orders)}\n"
    "\n"
    "\n"
    "def run(input, ctx):\n"
    "    return summarise(input['orders'])\n"
)


def message_of(result: StepRun) -> str:
    assert result.exit_code == 1, result.report
    message: str = result.report["error"]["message"]
    return message


def test_a_bug_deep_in_a_helper_names_the_file_line_and_source_line(run_step) -> None:
    result = run_step(DEEP_BUG, "--input", '{"orders": [{"n": 3}]}')

    message = message_of(result)
    assert result.error_type == "exception"
    lines = message.splitlines()
    assert lines[0] == "ZeroDivisionError: division by zero"
    assert message.count("division by zero") == 1  # once, not again under the traceback
    # The author's frames, outermost first, each with its source line under it.
    assert '  File "step.py", line 11, in run' in lines
    assert '  File "step.py", line 7, in summarise' in lines
    frame = lines.index('  File "step.py", line 3, in average')
    assert lines[frame + 1].strip() == "return total / len([o for o in orders if o.get('paid')])"
    # Nothing of the runtime that called run().
    assert "sandbox/" not in message and "runtimes" not in message


def test_a_syntax_error_names_file_line_and_caret_and_is_fatal(run_step) -> None:
    result = run_step("def run(input, ctx)\n    return input\n")

    message = message_of(result)
    assert result.error_type == "fatal"  # the same source fails every time: never retried
    lines = message.splitlines()
    assert lines[0] == "SyntaxError: expected ':'"
    assert lines[1] == '  File "step.py", line 1'
    assert lines[2].strip() == "def run(input, ctx)"
    assert lines[3].strip() == "^"
    assert message.count("expected ':'") == 1


def test_an_error_escaping_a_thread_ends_the_step_at_once(run_step) -> None:
    # run() waits for what its worker thread would produce; the worker raises instead.
    started = time.monotonic()
    result = run_step(
        "import queue, threading\n"
        "def work(results):\n"
        "    raise LookupError('no such customer')\n"
        "def run(input, ctx):\n"
        "    results = queue.Queue()\n"
        "    threading.Thread(target=work, args=(results,), name='worker').start()\n"
        "    return results.get()\n",
        "--wall-s",
        "20",
    )

    message = message_of(result)
    assert result.error_type == "exception"
    assert message.splitlines()[0] == "LookupError: no such customer"
    assert "thread 'worker'" in message
    assert '  File "step.py", line 3, in work' in message
    assert "threading.py" not in message  # the thread's bootstrap is the runtime's, not theirs
    assert time.monotonic() - started < 15  # not the wall clock's doing


def test_an_error_of_an_asyncio_task_nobody_awaited_ends_the_step(run_step) -> None:
    result = run_step(
        "import asyncio\n"
        "async def refresh():\n"
        "    raise PermissionError('token expired')\n"
        "async def run(input, ctx):\n"
        "    asyncio.get_running_loop().create_task(refresh())\n"
        "    await asyncio.sleep(30)\n",
        "--wall-s",
        "20",
    )

    message = message_of(result)
    assert result.error_type == "exception"
    assert message.splitlines()[0] == "PermissionError: token expired"
    assert "asyncio" in message.splitlines()[1]  # where it escaped from
    assert '  File "step.py", line 3, in refresh' in message


def test_fatal_from_runnerd_step_and_from_ctx(run_step) -> None:
    imported = run_step(
        "from runnerd.step import Fatal\n"
        "def run(input, ctx):\n"
        "    raise Fatal(f'order {input} has no customer')\n",
        "--input",
        "17",
    )
    on_ctx = run_step("def run(input, ctx):\n    raise ctx.Fatal('missing API key')\n")

    assert imported.error_type == "fatal"
    assert message_of(imported).splitlines()[0] == "Fatal: order 17 has no customer"
    assert '  File "step.py", line 3, in run' in message_of(imported)
    assert on_ctx.error_type == "fatal"
    assert message_of(on_ctx).splitlines()[0] == "Fatal: missing API key"


def test_the_pids_limit_is_named(run_step) -> None:
    result = run_step(
        "import subprocess\n"
        "def run(input, ctx):\n"
        "    return [subprocess.Popen(['sleep', '5']).pid for _ in range(40)]\n",
        "--pids",
        "16",
    )

    message = message_of(result)
    assert message.splitlines()[0].startswith("pids limit of 16 reached")
    assert "[Errno 11]" not in message
    assert '  File "step.py", line 3, in run' in message


def test_a_thread_past_the_pids_limit_is_named_too(run_step) -> None:
    result = run_step(
        "import threading, time\n"
        "def run(input, ctx):\n"
        "    for _ in range(40):\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n",
        "--pids",
        "16",
    )

    assert message_of(result).splitlines()[0].startswith("pids limit of 16 reached")


def test_a_connect_without_network_says_the_network_is_off(run_step) -> None:
    result = run_step(
        "import socket\n"
        "def run(input, ctx):\n"
        "    socket.create_connection(('127.0.0.1', 6379), timeout=2)\n"
    )

    message = message_of(result)
    first = message.splitlines()[0]
    assert first.startswith("network is off for this step")
    assert '"network": true' in first
    assert '  File "step.py", line 3, in run' in message


def test_an_unrelated_permission_error_is_not_blamed_on_the_network(run_step) -> None:
    result = run_step("import os\ndef run(input, ctx):\n    os.setgroups([12345])\n")

    message = message_of(result)
    assert message.splitlines()[0] == "PermissionError: [Errno 1] Operation not permitted"
    assert "network" not in message
