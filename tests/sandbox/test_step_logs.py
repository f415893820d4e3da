"""`ctx.log` lines, stdout and stderr are kept whatever way a step ends (issue 14): they travel
as they are written (Log frames, line-buffered stdout), not only inside the result."""

from __future__ import annotations

import pytest

BEFORE = (
    "import sys\n"
    "def run(input, ctx):\n"
    "    ctx.log.info('fetched 3 orders')\n"
    "    ctx.log.warning('order 2 has no customer')\n"
    "    print('printed before the end')\n"
    "    print('said on stderr', file=sys.stderr)\n"
)

ENDINGS = {
    "timeout": (BEFORE + "    import time\n    time.sleep(60)\n", ("--wall-s", "2"), "timeout"),
    "memory": (
        BEFORE + "    hog = []\n    while True:\n        hog.append(bytearray(8 << 20))\n",
        ("--memory-mb", "128"),
        "memory",
    ),
    # A fault is delivered even to pid 1 of a pid namespace, which ignores a plain kill.
    "killed": (BEFORE + "    import ctypes\n    ctypes.string_at(0)\n", (), "killed"),
    "crash": (BEFORE + "    import os\n    os._exit(3)\n", (), "protocol"),
    "exception": (BEFORE + "    raise RuntimeError('late')\n", (), "exception"),
}


@pytest.mark.parametrize("ending", ENDINGS, ids=list(ENDINGS))
def test_logs_and_output_survive_every_ending(run_step, ending: str) -> None:
    source, flags, error_type = ENDINGS[ending]
    result = run_step(source, *flags, timeout_s=90)

    assert result.exit_code == 1, result.report
    assert result.error_type == error_type, result.report["error"]
    assert result.report["logs"] == [
        "INFO fetched 3 orders",
        "WARNING order 2 has no customer",
    ]
    assert result.report["stdout"] == "printed before the end\n"
    assert result.report["stderr"].startswith("said on stderr\n")


def test_log_lines_from_a_thread_and_past_the_bound(run_step) -> None:
    result = run_step(
        "import threading\n"
        "def run(input, ctx):\n"
        "    t = threading.Thread(target=lambda: ctx.log.info('from a thread'))\n"
        "    t.start(); t.join()\n"
        "    for i in range(1200):\n"
        "        ctx.log.debug(f'line {i}')\n"
        "    return 'done'\n"
    )

    assert result.exit_code == 0, result.report
    logs = result.report["logs"]
    assert logs[0] == "INFO from a thread"
    assert logs[1] == "DEBUG line 0"
    assert len(logs) == 1000  # the bound, its last line saying how many were cut
    assert logs[-1] == "[202 more log lines cut]"
