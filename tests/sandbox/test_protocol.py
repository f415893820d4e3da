"""Frames and messages of the step and control channels."""

from __future__ import annotations

import socket
import struct

import msgspec
import pytest

from sandbox import protocol
from sandbox.errors import ProtocolError
from sandbox.protocol import Exited, Limits, Ready, Spawn, StepContext, StepRequest, StepResult


def test_frame_round_trip_over_a_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        request = StepRequest(
            filename="s.py",
            source="def run(i, c): return i",
            input=msgspec.Raw(msgspec.msgpack.encode({"k": b"\x00" * 10})),
            context=StepContext("exec-1", "fetch", 2),
        )
        a.sendall(protocol.encode_frame(request))
        decoded = protocol.decode_to_child(protocol.read_frame(b, 1 << 20))
    assert decoded.context == StepContext("exec-1", "fetch", 2)
    assert msgspec.msgpack.decode(decoded.input) == {"k": b"\x00" * 10}


def test_oversized_frame_is_refused_before_it_is_read() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", 10_000_000))
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            protocol.read_frame(b, 1000)


def test_truncated_frame_is_a_protocol_error() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(struct.pack(">I", 100) + b"short")
        a.close()
        with pytest.raises(ProtocolError, match="closed after 5 of 100"):
            protocol.read_frame(b, 1000)


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe", msgspec.msgpack.encode({"type": "nope"})])
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_from_child(garbage)
    with pytest.raises(ProtocolError):
        protocol.decode_to_zygote(garbage)


def test_unknown_fields_are_refused_on_the_control_channel() -> None:
    message = msgspec.msgpack.encode(
        {"type": "spawn", "request_id": 1, "runtime": "python", "limits": {}, "extra": 1}
    )
    with pytest.raises(ProtocolError):
        protocol.decode_to_zygote(message)


def test_tagged_unions_pick_the_right_struct() -> None:
    spawn = protocol.decode_to_zygote(protocol.encode(Spawn(7, "node", Limits(wall_s=2))))
    assert spawn == Spawn(7, "node", Limits(wall_s=2))
    exited = protocol.decode_from_zygote(protocol.encode(Exited(5, 9, 0.5, 1000, True)))
    assert exited == Exited(5, 9, 0.5, 1000, True)
    assert isinstance(protocol.decode_from_child(protocol.encode(Ready(["seccomp"]))), Ready)
    result = protocol.decode_from_child(protocol.encode(StepResult(ok=False)))
    assert isinstance(result, StepResult)
    assert bytes(result.output) == b"\xc0"


BIG = msgspec.Raw(msgspec.msgpack.encode(b"x" * 100_000))


@pytest.mark.parametrize(
    ("message", "buffers"),
    [
        (StepResult(ok=True, output=BIG, logs=["a"], duration_s=0.5), 2),
        (StepResult(ok=True, output=msgspec.Raw(b"\xc0"), logs=["a", "b"]), 1),
        (StepResult(ok=False, error=protocol.StepError("exception", "boom")), 1),
        (StepRequest(filename="s.py", source="x", input=BIG, env={"A": "1"}), 2),
        (StepRequest(filename="s.py", source="x", input=msgspec.Raw(b"\x01")), 1),
    ],
)
def test_frame_in_buffers_is_the_whole_frame(
    message: StepRequest | StepResult, buffers: int
) -> None:
    parts = protocol.frame_buffers(message)
    a, b = socket.socketpair()
    with a, b:
        for part in parts:
            a.sendall(part)
        frame = protocol.read_frame(b, 1 << 20)
    if isinstance(message, StepRequest):
        assert protocol.decode_to_child(frame) == message
    else:
        assert protocol.decode_from_child(frame) == message
    assert b"".join(bytes(part) for part in parts) == bytes(protocol.encode_frame(message))
    assert len(parts) == buffers, "a large payload follows the rest of its frame as it is"
