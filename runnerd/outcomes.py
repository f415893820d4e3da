"""What the CLI says about a step and the sandbox, for the local commands (cli.py) and the
Redis ones (commands.py) alike: exit codes, the --input argument, the run-step report (the
output decoded within sandbox/bounded.py's bounds) and the word on missing sandbox layers."""

from __future__ import annotations

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
EXIT_NO_RESULT = 3  # result, submit --wait: the execution has no result (yet)


def read_json_input(value: str) -> Any:
    """--input: JSON text, or @path to a JSON file."""
    text = value
    if value.startswith("@"):
        text = read_text(Path(value[1:]), "input file")
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise UsageError(f"--input is not valid JSON: {exc}") from exc


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
