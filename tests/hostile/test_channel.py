"""A step attacks its result channel (fd 3, length-prefixed msgpack frames to the caller): an
oversized result, garbage on every fd, a frame cut short, a forged frame. Each must end as that
step's own failure, with the caller intact and its memory bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hostile.conftest import RunStep, Witnesses, run_step_measured

OUTPUT_LIMIT_MB = 128  # Limits.output_mb; run-step has no flag to lower it

OVERSIZED = {
    ".py": f"""
def run(input, ctx):
    return b"x" * ({OUTPUT_LIMIT_MB + 1} * 1024 * 1024)
""",
    ".mjs": f"""
export function run(input, ctx) {{
  return Buffer.alloc({OUTPUT_LIMIT_MB + 1} * 1024 * 1024, 120);
}}
""",
}

# 0xc1 is the one byte msgpack never uses; as a frame header it announces ~3 GB.
GARBAGE = {
    ".py": """
import os

def run(input, ctx):
    wrote = []
    for fd in range(1024):
        try:
            os.write(fd, b"\\xc1" * 64)
            wrote.append(fd)
        except OSError:
            pass
    return wrote
""",
    ".mjs": """
import fs from "node:fs";

export function run(input, ctx) {
  const wrote = [];
  for (let fd = 0; fd < 1024; fd++) {
    try { fs.writeSync(fd, Buffer.alloc(64, 0xc1)); wrote.push(fd); } catch {}
  }
  return wrote;
}
""",
}

# A header announcing 100 bytes, 10 of them, then the step leaves without a word.
TRUNCATED = """
import os

def run(input, ctx):
    os.write(3, (100).to_bytes(4, "big") + b"\\x00" * 10)
    os._exit(0)
"""

# A header announcing 120 MB (within the output limit), then nothing: the caller must not set
# aside memory for what was only announced.
ANNOUNCED_ONLY = """
import os, time

def run(input, ctx):
    os.write(3, (120 * 1024 * 1024).to_bytes(4, "big") + b"\\x92")
    time.sleep(60)
"""
CALLER_RSS_MAX_MB = 100  # run-step itself is ~40 MB; the announced frame would add 120

# A well-formed result frame written by the step itself, skipping the runtime's output check.
FORGED_OVERSIZED = f"""
import os
import msgspec
from sandbox import protocol

def run(input, ctx):
    output = msgspec.msgpack.encode("x" * ({OUTPUT_LIMIT_MB + 1} * 1024 * 1024))
    frame = protocol.encode_frame(protocol.StepResult(ok=True, output=msgspec.Raw(output)))
    view = memoryview(frame)
    while view:
        view = view[os.write(3, view) :]
    os._exit(0)
"""

# Legal results of 16 MB that decode to 1.2 GB of Python objects (one byte per item): the caller
# walks them before decoding and refuses them past 2,000,000 items, unbuilt.
MANY_ITEMS = {
    ".py": """
def run(input, ctx):
    return [{}] * 16_000_000
""",
    ".mjs": """
export function run(input, ctx) {
  return new Array(16_000_000).fill(0);
}
""",
}
# run-step is ~40 MB and reads the 16 MB frame; decoding it took 1.2 GB.
CALLER_MANY_ITEMS_RSS_MAX_MB = 200

# 100,000 nested lists as msgpack the step wrote itself (msgspec sends a Raw as it is): decoding
# or even skipping them recursed past the interpreter's limit.
DEEP = """
import msgspec

def run(input, ctx):
    return msgspec.Raw(b"\\x91" * 100_000 + b"\\xc0")
"""

# A well-formed 48 MB result frame written by the step itself, whose logs are 16 M strings: the
# caller decodes logs, which took GBs before they could be cut to 1000 lines.
FORGED_LOGS = """
import os
from sandbox import protocol

def run(input, ctx):
    frame = protocol.encode_frame(protocol.StepResult(ok=True, logs=["ab"] * 16_000_000))
    view = memoryview(frame)
    while view:
        view = view[os.write(3, view) :]
    os._exit(0)
"""


@pytest.mark.parametrize("suffix", [".py", ".mjs"])
def test_oversized_result(run_step: RunStep, suffix: str, witnesses: Witnesses) -> None:
    result = run_step(OVERSIZED[suffix], suffix=suffix)

    assert result.error_type == "output_limit", result.report
    assert result.output is None
    witnesses.assert_unharmed()


@pytest.mark.parametrize("suffix", [".py", ".mjs"])
def test_garbage_on_every_fd(run_step: RunStep, suffix: str, witnesses: Witnesses) -> None:
    result = run_step(GARBAGE[suffix], suffix=suffix)

    # The caller refused the 3 GB frame from its header alone, and still reported.
    assert result.exit_code == 1
    assert result.error_type == "protocol", result.report
    assert "exceeds the limit" in result.report["error"]["message"]
    # The garbage that went to stdout/stderr is only text in the report.
    assert "\ufffd" in result.report["stdout"]
    witnesses.assert_unharmed()


def test_truncated_result_frame(run_step: RunStep, witnesses: Witnesses) -> None:
    result = run_step(TRUNCATED)

    assert result.error_type == "protocol", result.report
    assert "without sending a result" in result.report["error"]["message"]
    witnesses.assert_unharmed()


def test_forged_result_frame_past_the_output_limit(run_step: RunStep, witnesses: Witnesses) -> None:
    result = run_step(FORGED_OVERSIZED)
    error, output_bytes = result.report["error"], len(result.output or "")
    del result  # 129 MB: keep it out of assertion messages

    witnesses.assert_unharmed()
    assert error is not None and error["type"] == "output_limit", f"{output_bytes} bytes accepted"


def test_announced_frame_takes_no_memory_until_it_arrives(
    profile: str, tmp_path: Path, witnesses: Witnesses
) -> None:
    step = tmp_path / "announce.py"
    step.write_text(ANNOUNCED_ONLY)
    measured = run_step_measured(profile, step, "--wall-s", "2", timeout_s=60)

    assert measured.run.error_type == "timeout", measured.run.report
    assert 0 < measured.caller_peak_rss_mb < CALLER_RSS_MAX_MB, measured.caller_peak_rss_mb
    witnesses.assert_unharmed()


@pytest.mark.parametrize("suffix", [".py", ".mjs"])
def test_result_of_many_items_is_refused_unbuilt(
    profile: str, tmp_path: Path, suffix: str, witnesses: Witnesses
) -> None:
    step = tmp_path / f"many{suffix}"
    step.write_text(MANY_ITEMS[suffix])
    measured = run_step_measured(profile, step, timeout_s=90)

    assert measured.run.exit_code == 1
    assert measured.run.error_type == "output_limit", measured.run.report
    assert "more than 2,000,000 items" in measured.run.report["error"]["message"]
    assert 0 < measured.caller_peak_rss_mb < CALLER_MANY_ITEMS_RSS_MAX_MB, (
        measured.caller_peak_rss_mb
    )
    witnesses.assert_unharmed()


def test_deeply_nested_result_is_refused_without_recursion(
    run_step: RunStep, witnesses: Witnesses
) -> None:
    result = run_step(DEEP)

    assert result.exit_code == 1
    assert result.error_type == "output_limit", result.report
    assert "nested deeper than 64 levels" in result.report["error"]["message"]
    assert "RecursionError" not in result.stderr
    witnesses.assert_unharmed()


def test_forged_frame_of_many_log_lines_is_refused_unbuilt(
    profile: str, tmp_path: Path, witnesses: Witnesses
) -> None:
    step = tmp_path / "logs.py"
    step.write_text(FORGED_LOGS)
    measured = run_step_measured(profile, step, timeout_s=90)

    assert measured.run.error_type == "output_limit", measured.run.report
    assert "items" in measured.run.report["error"]["message"]
    assert 0 < measured.caller_peak_rss_mb < CALLER_MANY_ITEMS_RSS_MAX_MB, (
        measured.caller_peak_rss_mb
    )
    witnesses.assert_unharmed()


# One string is one item: a 120 MB error message passes any item count, and with one astral
# character in it CPython builds it at 4 bytes a character (1.6 GB in the caller before).
FORGED_LONG_TEXT = """
import os, struct, msgspec
from sandbox import protocol

def run(input, ctx):
    text = "\\U0001F600" + "x" * (input["mb"] * 1024 * 1024)
    if input["where"] == "error":
        result = protocol.StepResult(ok=False, error=protocol.StepError("exception", text))
    else:
        result = protocol.StepResult(ok=True, logs=[text])
    frame = protocol.encode_frame(result)
    view = memoryview(frame)
    while view:
        view = view[os.write(3, view) :]
    os._exit(0)
"""


@pytest.mark.parametrize("where", ["error", "logs"])
def test_forged_long_error_or_log_line_is_refused_unbuilt(
    profile: str, tmp_path: Path, where: str, witnesses: Witnesses
) -> None:
    step = tmp_path / "long.py"
    step.write_text(FORGED_LONG_TEXT)
    spec = json.dumps({"mb": 100, "where": where})
    measured = run_step_measured(profile, step, "--input", spec, timeout_s=90)

    assert measured.run.error_type == "output_limit", measured.run.report
    assert "logs and an error message of more than" in measured.run.report["error"]["message"]
    assert 0 < measured.caller_peak_rss_mb < CALLER_MANY_ITEMS_RSS_MAX_MB, (
        measured.caller_peak_rss_mb
    )
    witnesses.assert_unharmed()


def test_long_error_message_is_cut(run_step: RunStep, witnesses: Witnesses) -> None:
    result = run_step("def run(input, ctx):\n    raise ValueError('x' * 1_000_000)\n")

    assert result.error_type == "exception", result.report
    assert len(result.report["error"]["message"]) < 70_000
    assert result.report["error"]["message"].endswith("[cut]")
    witnesses.assert_unharmed()
