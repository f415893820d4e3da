"""runnerd/masking.py on the edges a whole run rarely reaches: a secret cut in two by a stdout
tail or a log line's limit, msgpack whose framing a byte-level mask would break, outputs that
cannot be decoded."""

from __future__ import annotations

import msgspec

from runnerd.child_link import ERROR_MESSAGE_MAX, LOG_LINE_MAX
from runnerd.masking import MASK, mask_outcome, mask_output
from runnerd.messages import StepOutcome
from sandbox.protocol import StepError

SECRET = "sk-0123456789abcdef"


def test_a_secret_cut_by_the_head_of_a_stdout_tail_is_masked() -> None:
    tail = SECRET[5:] + " then the rest"
    outcome = StepOutcome(ok=True, stdout=tail, stderr=tail, stdout_truncated=True)

    masked = mask_outcome(outcome, [SECRET])

    assert masked.stdout == MASK + " then the rest"
    assert masked.stderr == tail  # not cut: the same text is the step's own


def test_a_secret_cut_by_a_log_line_or_error_limit_is_masked() -> None:
    line = "x" * (LOG_LINE_MAX - 6) + SECRET[:6]
    message = "y" * (ERROR_MESSAGE_MAX - 4) + SECRET[:4] + " [cut]"
    outcome = StepOutcome(ok=False, error=StepError("exception", message), logs=[line, "short"])

    masked = mask_outcome(outcome, [SECRET])

    assert masked.logs == ["x" * (LOG_LINE_MAX - 6) + MASK, "short"]
    assert masked.error is not None
    assert masked.error.message == "y" * (ERROR_MESSAGE_MAX - 4) + MASK + " [cut]"


def test_output_strings_bytes_and_keys_are_masked_and_stay_msgpack() -> None:
    value = {"s": f"<{SECRET}>", SECRET: [SECRET.encode()], "n": [1, 2, 3]}
    masked, problem = mask_output(msgspec.Raw(msgspec.msgpack.encode(value)), [SECRET])

    assert problem is None
    assert msgspec.msgpack.decode(masked) == {
        "s": f"<{MASK}>",
        MASK: [MASK.encode()],
        "n": [1, 2, 3],
    }


def test_a_secret_spelled_by_msgpack_framing_fails_the_step() -> None:
    # A str16 whose length bytes are the secret's first two characters and whose text is the
    # rest: no string holds the secret, the encoding does; overwriting it would rewrite the
    # length. Only a step that built this on purpose gets here (it could as well base64 it).
    secret = "\x01\x02" + "a" * 14
    body = "a" * 14 + "b" * (0x0102 - 14)
    encoded = msgspec.msgpack.encode({"k": body})
    assert secret.encode() in encoded

    masked, problem = mask_output(msgspec.Raw(encoded), [secret])

    assert problem is not None and problem.type == "secret"
    assert secret.encode() not in bytes(masked)
    outcome = mask_outcome(StepOutcome(ok=True, output=msgspec.Raw(encoded)), [secret])
    assert not outcome.ok and outcome.error == problem and bytes(outcome.output) == b"\xc0"


def test_an_output_without_the_secret_passes_untouched() -> None:
    raw = msgspec.Raw(msgspec.msgpack.encode({"a": "b" * 1000}))
    masked, problem = mask_output(raw, [SECRET])
    assert masked is raw and problem is None


def test_an_undecodable_output_is_masked_byte_for_byte() -> None:
    raw = msgspec.Raw(b"\xc1" + SECRET.encode())  # 0xc1: never used by msgpack
    masked, problem = mask_output(raw, [SECRET])
    assert bytes(masked) == b"\xc1" + b"*" * len(SECRET) and problem is None
