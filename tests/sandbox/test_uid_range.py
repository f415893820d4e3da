"""Two runnerd on one machine never share sandbox uids: an explicit range held by a live
instance is refused with one clear line, an unset one moves to a free range, and a dead
holder's claim is taken over. End to end: two `run-step`s at once under the Fargate profile
(no pid namespace, so a slot is cleaned with kill(-1) as its uid) leave each other's steps
alone."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox import uid_range
from tests.conftest import runnerd_argv, runnerd_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root claims uid ranges")

HOLD = """
import sys, time
from sandbox import uid_range
claim = uid_range.claim(int(sys.argv[1]), int(sys.argv[2]))
print(claim.base, flush=True)
time.sleep(60)
"""


def _free_base() -> int:
    return random.randrange(5000, 9000) * 1000


def _hold_in_process(base: int, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(base), str(count)],
        stdout=subprocess.PIPE,
        text=True,
        env=runnerd_env(),
    )
    assert proc.stdout is not None
    assert int(proc.stdout.readline()) == base
    return proc


def test_an_explicit_range_held_by_a_live_instance_is_refused() -> None:
    base = _free_base()
    holder = _hold_in_process(base, 10)
    try:
        with pytest.raises(uid_range.UidRangeTaken, match="RUNNERD_SANDBOX_UID_BASE"):
            uid_range.claim(base + 5, 10)  # overlapping, not equal
        apart = uid_range.claim(base + 10, 10)  # adjacent: no overlap
        apart.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_claim_is_taken_over() -> None:
    base = _free_base()
    holder = _hold_in_process(base, 10)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    elsewhere = _free_base()
    far = _hold_in_process(elsewhere, 10)
    far.send_signal(signal.SIGKILL)
    far.wait()
    claim = uid_range.claim(base, 10)  # the kernel dropped the lock with its holder
    assert claim.base == base
    # A dead holder's file is removed by the next claim, even where it does not overlap.
    assert not os.path.exists(f"/run/runnerd/uids-{elsewhere}-10.lock")
    claim.release()


def test_an_unset_range_moves_to_a_free_one() -> None:
    first = uid_range.claim(0, 257)
    try:
        second = uid_range.claim(0, 257)
        try:
            assert second.base >= first.base + 257 or second.base + 257 <= first.base
        finally:
            second.release()
    finally:
        first.release()


SLOW_STEP = "import time\ndef run(input, ctx):\n    time.sleep(4)\n    return 'survived'\n"
QUICK_STEP = "def run(input, ctx):\n    return 'quick'\n"


def _slow_step_beside_a_quick_one(
    tmp_path: Path, profile: str, env: dict[str, str]
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """A slow step's run-step, and a quick one's started while the slow step runs: the first's
    stdout, and the second run whole."""
    slow, quick = tmp_path / "slow.py", tmp_path / "quick.py"
    slow.write_text(SLOW_STEP)
    quick.write_text(QUICK_STEP)
    first = subprocess.Popen(
        runnerd_argv(profile, "run-step", str(slow)), stdout=subprocess.PIPE, text=True, env=env
    )
    time.sleep(1.5)  # the slow step is running when the second instance starts and cleans
    second = subprocess.run(
        runnerd_argv(profile, "run-step", str(quick)),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    out, _ = first.communicate(timeout=60)
    return out, second


def test_two_run_steps_at_once_leave_each_other_alone(tmp_path: Path) -> None:
    env = runnerd_env()
    env.pop("RUNNERD_SANDBOX_UID_BASE", None)  # both pick their range themselves
    out, second = _slow_step_beside_a_quick_one(tmp_path, "fargate", env)
    assert json.loads(second.stdout)["output"] == "quick"
    assert json.loads(out)["output"] == "survived"


def test_the_same_explicit_range_twice_is_refused_in_one_line(tmp_path: Path) -> None:
    env = runnerd_env(RUNNERD_SANDBOX_UID_BASE=str(_free_base()))
    out, second = _slow_step_beside_a_quick_one(tmp_path, "full", env)
    assert json.loads(out)["output"] == "survived"
    assert second.returncode != 0
    assert "held by another runnerd" in second.stderr + second.stdout
    assert "Traceback" not in second.stderr
