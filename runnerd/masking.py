"""Secret values never leave the worker: every occurrence in what a step's outcome carries
(stdout, stderr, ctx.log lines, the error message, the output) is replaced by `***` before the
outcome is used for anything (the next step's input, the checkpoint, the result, a log line).

Text is masked with str.replace. Where runnerd cut a text (the head of a stdout or stderr tail,
the end of a log line or an error message at their limits) the part of a secret left at the cut
is masked too: the tail of a stream that begins with the last characters of a secret must not
show them.

The output is msgpack, undecoded. Most outputs hold no secret, and a search of the bytes for
each value (memchr-fast, ~1 ms for 10 MB) says so: they pass as they are. One that holds a secret
is decoded within sandbox/bounded.py's bounds, its strings, bytes, keys and ext data masked, and
encoded again: a byte-level replacement can cut through msgpack framing (a secret's bytes can
span a str16 length header and the string after it), and `***` is shorter than the secret,
which no framing survives. Bytes that still match once re-encoded are not in any string (ints
that spell it, say): they are overwritten with `*` at the same length, and if that breaks the
msgpack the step fails with `secret`. An output that cannot be decoded (past the bounds; it
fails later as `output_limit` or `protocol`) is masked at the same length, byte by byte.
Encoded forms (base64, hex, reversed, split over two strings) are not found: see
docs/SECURITY.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from runnerd.child_link import ERROR_MESSAGE_MAX, LOG_LINE_MAX
from runnerd.messages import StepOutcome
from sandbox import bounded
from sandbox.bounded import DecodeLimitError
from sandbox.protocol import NIL, StepError

MASK = "***"
CUT_MARK = " [cut]"  # what child_link.py puts after an error message it cut


def mask_outcome(outcome: StepOutcome, values: Iterable[str]) -> StepOutcome:
    """The outcome with every value masked; the same object when there is nothing to mask."""
    secrets = sorted(set(values), key=len, reverse=True)  # a longer one first: it may hold another
    if not secrets:
        return outcome
    output, problem = mask_output(outcome.output, secrets)
    error = outcome.error
    if error is not None:
        cut = len(error.message) > ERROR_MESSAGE_MAX and error.message.endswith(CUT_MARK)
        message = error.message.removesuffix(CUT_MARK) if cut else error.message
        message = mask_text(message, secrets, cut_end=cut) + (CUT_MARK if cut else "")
        error = StepError(error.type, message)
    if problem is not None:
        error, output = problem, NIL
    return msgspec.structs.replace(
        outcome,
        ok=outcome.ok and problem is None,
        output=output,
        error=error,
        stdout=mask_text(outcome.stdout, secrets, cut_start=outcome.stdout_truncated),
        stderr=mask_text(outcome.stderr, secrets, cut_start=outcome.stderr_truncated),
        logs=[mask_text(line, secrets, cut_end=len(line) >= LOG_LINE_MAX) for line in outcome.logs],
    )


def mask_text(text: str, secrets: list[str], cut_start: bool = False, cut_end: bool = False) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    if cut_start:
        # The tail began inside a secret: its first characters are the secret's last ones (a
        # character cut in two decodes as U+FFFD, which goes too).
        body = text.lstrip("\ufffd")
        size = max((_overlap(secret[::-1], body[::-1]) for secret in secrets), default=0)
        if size:
            text = MASK + body[size:]
    if cut_end:  # the text ends with the first characters of a secret
        size = max((_overlap(secret, text) for secret in secrets), default=0)
        if size:
            text = text[:-size] + MASK
    return text


def _overlap(secret: str, text: str) -> int:
    """The length of the longest proper prefix of `secret` that `text` ends with."""
    for size in range(min(len(secret) - 1, len(text)), 0, -1):
        if text.endswith(secret[:size]):
            return size
    return 0


def mask_output(output: msgspec.Raw, secrets: list[str]) -> tuple[msgspec.Raw, StepError | None]:
    """The output with the secrets masked, and the error when that cannot keep it msgpack."""
    needles = [secret.encode() for secret in secrets]
    data = bytes(output)
    if not any(needle in data for needle in needles):
        return output, None
    try:
        value = bounded.decode(data)
    except (DecodeLimitError, msgspec.DecodeError):
        return msgspec.Raw(_same_length(data, needles)), None
    encoded = msgspec.msgpack.encode(_walk(value, secrets, needles))
    if any(needle in encoded for needle in needles):
        encoded = _same_length(encoded, needles)
        try:
            bounded.check(encoded)
        except (DecodeLimitError, msgspec.DecodeError):
            message = "the step's output holds a secret in a form that cannot be masked"
            return NIL, StepError("secret", message)
    return msgspec.Raw(encoded), None


def _walk(value: Any, secrets: list[str], needles: list[bytes]) -> Any:
    if isinstance(value, str):
        return mask_text(value, secrets)
    if isinstance(value, bytes):
        for needle in needles:
            value = value.replace(needle, MASK.encode())
        return value
    if isinstance(value, list):
        return [_walk(item, secrets, needles) for item in value]
    if isinstance(value, tuple):  # an array as a map key
        return tuple(_walk(item, secrets, needles) for item in value)
    if isinstance(value, dict):
        return {
            _walk(key, secrets, needles): _walk(item, secrets, needles)
            for key, item in value.items()
        }
    if isinstance(value, msgspec.msgpack.Ext):
        return msgspec.msgpack.Ext(value.code, _walk(value.data, secrets, needles))
    return value


def _same_length(data: bytes, needles: list[bytes]) -> bytes:
    for needle in needles:
        data = data.replace(needle, b"*" * len(needle))
    return data
