"""A step attacks the `Log` frames that carry its `ctx.log` lines as they are written: a forged
100 MB log line, a flood of frames. Each ends as that step's own failure or is cut to the
bounds, with the caller intact and its memory bounded."""

from __future__ import annotations

from pathlib import Path

from tests.hostile.conftest import RunStep, Witnesses, run_step_measured

CALLER_RSS_MAX_MB = 200

FORGED_LONG_LOG = """
import os
from sandbox import protocol

def run(input, ctx):
    ctx.log.info("an honest line first")
    frame = protocol.encode_frame(protocol.Log(["\\U0001F600" + "x" * (100 * 1024 * 1024)]))
    view = memoryview(frame)
    while view:
        view = view[os.write(3, view) :]
    return "never seen"
"""

FLOOD = """
import os
from sandbox import protocol

def run(input, ctx):
    frame = protocol.encode_frame(protocol.Log(["y" * 10_000] * 50))
    for _ in range(400):
        os.write(3, frame)
    return "after the flood"
"""


def test_a_forged_long_log_frame_is_refused_unbuilt(
    profile: str, tmp_path: Path, witnesses: Witnesses
) -> None:
    step = tmp_path / "long_log.py"
    step.write_text(FORGED_LONG_LOG)
    measured = run_step_measured(profile, step, timeout_s=90)

    assert measured.run.error_type == "output_limit", measured.run.report
    assert measured.run.report["logs"] == ["INFO an honest line first"]
    assert 0 < measured.caller_peak_rss_mb < CALLER_RSS_MAX_MB, measured.caller_peak_rss_mb
    witnesses.assert_unharmed()


def test_a_flood_of_log_frames_ends_the_step_with_its_first_lines_kept(
    run_step: RunStep, witnesses: Witnesses
) -> None:
    # Every frame is the caller's work to read and walk: past what ctx.log can write (1000
    # frames, or their bytes) the step is writing frames itself, and is stopped.
    result = run_step(FLOOD)

    assert result.exit_code == 1, result.report
    assert result.error_type == "protocol", result.report
    assert "more log frames than ctx.log writes" in result.report["error"]["message"]
    assert len(result.report["logs"]) == 1000
    assert {len(line) for line in result.report["logs"]} == {4096}
    witnesses.assert_unharmed()


EMPTY_FRAMES = """
import os
from sandbox import protocol

def run(input, ctx):
    frame = protocol.encode_frame(protocol.Log([]))
    for _ in range(100_000):
        os.write(3, frame)
    return "after the flood"
"""


def test_a_flood_of_empty_log_frames_ends_the_step(run_step: RunStep, witnesses: Witnesses) -> None:
    # Frames without a line cost no line of the budget, but they cost the caller a read each.
    result = run_step(EMPTY_FRAMES)

    assert result.error_type == "protocol", result.report
    assert "more log frames than ctx.log writes" in result.report["error"]["message"]
    witnesses.assert_unharmed()


FORGED_END = """
import os
from sandbox import protocol

def run(input, ctx):
    error = protocol.StepError("memory", "the step says it ran out of memory")
    frame = protocol.encode_frame(protocol.StepResult(ok=False, error=error))
    os.write(3, frame)
    os._exit(0)
"""


def test_a_step_cannot_report_an_end_only_the_caller_finds_out(
    run_step: RunStep, witnesses: Witnesses
) -> None:
    result = run_step(FORGED_END.replace('"memory"', '"timeout"'))
    assert result.error_type == "protocol", result.report
    assert "reported its own end as 'timeout'" in result.report["error"]["message"]
    witnesses.assert_unharmed()
