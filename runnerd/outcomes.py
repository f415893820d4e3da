"""What the CLI says about a step and the sandbox, for the local commands (cli.py, run_step.py)
and the Redis ones (commands.py) alike: exit codes, the --input argument, the run-step report
(the output decoded within sandbox/bounded.py's bounds) as JSON or as a readable summary, and
the word on missing sandbox layers."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import msgspec

from runnerd.errors import UsageError
from runnerd.messages import StepOutcome
from runnerd.settings import Settings
from sandbox import bounded
from sandbox.bounded import DecodeLimitError
from sandbox.protocol import Capabilities, StepError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Nothing there (yet): result and submit --wait without a result, cancel of an unknown
# execution, a dead letter that does not exist.
EXIT_NO_RESULT = 3
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
_BYTE = re.compile(r"\(byte (?P<offset>\d+)\)")


def read_json_input(value: str) -> Any:
    """--input: JSON text, or @path to a JSON file."""
    text = value
    if value.startswith("@"):
        text = read_text(Path(value[1:]), "input file")
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise UsageError(f"--input is not valid JSON: {exc}") from exc


def is_json_lines(value: str) -> bool:
    """--input @file.jsonl (or .ndjson): one input per line."""
    return value.startswith("@") and value.lower().endswith(JSON_LINES_SUFFIXES)


def read_json_lines(value: str) -> list[Any]:
    """--input @inputs.jsonl: one JSON value per line, blank lines skipped. Every line is
    decoded before anything is submitted, so a bad line (named by its number) submits none."""
    path = value[1:]
    inputs = []
    for number, line in enumerate(read_text(Path(path), "input file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            inputs.append(msgspec.json.decode(line))
        except msgspec.DecodeError as exc:
            where = _with_column(str(exc), line)
            raise UsageError(
                f"--input {path} line {number} is not valid JSON: {where}; nothing was submitted"
            ) from exc
    if not inputs:
        raise UsageError(f"--input {path} has no inputs (one JSON value per line)")
    return inputs


def _with_column(message: str, line: str) -> str:
    """msgspec's "(byte N)" as the column a person counts (characters, from 1)."""
    found = _BYTE.search(message)
    if found is None:
        return message
    column = len(line.encode()[: int(found["offset"])].decode(errors="replace")) + 1
    return message.replace(found[0], f"(column {column})")


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {what} {str(path)!r}: {reason}") from exc


def decode_output(outcome: StepOutcome) -> tuple[Any, StepError | None]:
    """A step's output decoded, and its error. The step wrote that msgpack, so it is decoded
    within sandbox/bounded.py's bounds: past them (or not msgpack at all) the output is not
    built, and the step counts as failed, with `output_limit` (or `protocol`)."""
    if not outcome.ok:
        return None, outcome.error
    try:
        return bounded.decode(outcome.output), None
    except DecodeLimitError as exc:
        return None, StepError("output_limit", f"the step's output has {exc}")
    except msgspec.DecodeError as exc:
        return None, StepError("protocol", f"the step's output is not valid msgpack: {exc}")


def outcome_json(outcome: StepOutcome) -> dict[str, Any]:
    """The run-step report: the outcome with `output` decoded (bytes become base64 in JSON);
    `ok` is false when the output could not be decoded (see decode_output)."""
    report = msgspec.structs.asdict(outcome)
    output, error = decode_output(outcome)
    report["ok"] = error is None and outcome.ok
    report["output"] = output
    report["error"] = msgspec.structs.asdict(error) if error else None
    return report


def outcome_text(report: dict[str, Any], name: str) -> str:
    """The run-step report for a person: what happened, the output or the error (its message
    is the step's file, line and source line already), then logs, stdout and stderr."""
    error = report["error"]
    took = f"{report['duration_s'] * 1000:.1f} ms"
    if error is None:
        lines = [f"{name}: succeeded in {took}", "output:"]
        lines += _indented(msgspec.json.format(msgspec.json.encode(report["output"])).decode())
    else:
        lines = [f"{name}: failed ({error['type']}) after {took}", "error:"]
        lines += _indented(error["message"])
    if report["logs"]:
        lines += [f"logs ({len(report['logs'])}):", *_indented("\n".join(report["logs"]))]
    for stream in ("stdout", "stderr"):
        if report[stream]:
            cut = " (the end of it)" if report[f"{stream}_truncated"] else ""
            lines += [f"{stream}{cut}:", *_indented(report[stream].rstrip("\n"))]
    return "\n".join(lines)


def _indented(text: str) -> list[str]:
    return ["  " + line if line else "" for line in text.splitlines()] or ["  (empty)"]


def write_stdout(text: str) -> None:
    """All of `text` on stdout. A report can be megabytes, and a pipe takes it in parts when a
    signal (SIGCHLD of the zygote) interrupts the write: unbuffered (PYTHONUNBUFFERED, -u),
    sys.stdout would drop the rest, so the bytes go to the fd until they are all written."""
    sys.stdout.flush()
    data = memoryview(text.encode())
    while data:
        data = data[os.write(sys.stdout.fileno(), data) :]


def check_required_layers(settings: Settings, capabilities: Capabilities) -> str | None:
    """In strict mode, the reason to refuse; in best-effort mode, a warning on stderr."""
    for problem in capabilities.problems:
        print(f"runnerd: warning: {problem}", file=sys.stderr)
    missing = capabilities.missing(list(settings.sandbox_require))
    if not missing:
        return None
    message = f"required sandbox layers missing on this host: {', '.join(missing)}"
    if settings.sandbox_mode == "strict":
        return f"refusing to run: {message} (RUNNERD_SANDBOX_MODE=strict)"
    print(f"runnerd: warning: {message}; running best-effort", file=sys.stderr)
    return None
