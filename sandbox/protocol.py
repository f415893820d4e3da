"""Everything that crosses a process boundary in the sandbox, and how it is framed.

Two channels exist:

* the **control channel** between the caller and the zygote: an AF_UNIX SOCK_SEQPACKET
  socket, one msgpack message per packet, file descriptors attached with SCM_RIGHTS. It
  carries only small messages (spawn this, it started, it exited): never step code or data.
* the **step channel** between the caller and one child: an AF_UNIX SOCK_STREAM socketpair
  carrying length-prefixed msgpack frames (4-byte big-endian length, then the payload). The
  child says `Ready`, receives one `StepRequest`, answers one `StepResult`, and exits. Between
  the request and the result it may send `Log` frames: the step's `ctx.log` lines as they are
  written, so that they outlive a step killed before it could answer.

The JavaScript runner (runtimes/step_runner.cjs) speaks the step channel too; keep the two in step.
"""

from __future__ import annotations

import mmap
import socket
import struct
from typing import Literal, TypeAlias, TypeVar

import msgspec

from sandbox.errors import ProtocolError

Runtime = Literal["python", "node", "exec"]
# `fatal`: the step failed in a way no retry can change (it raised Fatal, its source does not
# compile, it defines no run); the executor fails the execution at once instead of retrying it.
ErrorType = Literal[
    "exception",
    "fatal",
    "timeout",
    "memory",
    "cpu",
    "output_limit",
    "killed",
    "protocol",
    "sandbox",
    "cancelled",  # set by runnerd, never by a child: an operator cancelled the execution
    "secret",  # set by runnerd, never by a child: a secret the step names cannot be given it
    "bundle",  # set by runnerd: the step's dependency bundle could not be fetched or unpacked
]

T = TypeVar("T")
# A payload above this is sent after its frame's head instead of copied into it (frame_buffers).
SPLIT_PAYLOAD_BYTES = 64 * 1024
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap  # what a frame is read into
FRAME_HEADER = struct.Struct(">I")
CONTROL_PACKET_MAX = 64 * 1024
# A Ready frame or an error frame is tiny; anything bigger before the request is a protocol error.
SMALL_FRAME_MAX = 64 * 1024


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Resource limits for one step. Units are in the names."""

    wall_s: float = 30.0
    cpu_s: int = 30
    memory_mb: int = 1024
    pids: int = 64
    open_files: int = 256
    file_size_mb: int = 256
    tmp_mb: int = 256
    output_mb: int = 128
    stdio_kb: int = 64
    network: bool = False


class LayerStatus(msgspec.Struct, frozen=True):
    ok: bool
    reason: str = ""


class Capabilities(msgspec.Struct, frozen=True):
    """What the probe found: layer name -> whether it works on this host, and why not.

    `problems` are things that will break steps although every layer works (e.g. the runtime's
    files not readable by the unprivileged step uid). `writable_dirs`: without a filesystem
    view, the host's directories every user may write to, which a step's slot is cleaned in.
    """

    layers: dict[str, LayerStatus]
    problems: list[str] = []
    writable_dirs: list[str] = []
    # How JavaScript steps start: forked from the node zygote, or a node exec'd per step, and
    # why not forked when they are not (sandbox/node_fork.py).
    node_forked: bool = False
    node_fork_note: str = ""

    def available(self) -> list[str]:
        return sorted(name for name, status in self.layers.items() if status.ok)

    def missing(self, required: list[str]) -> list[str]:
        return [name for name in required if not self.layers.get(name, LayerStatus(False)).ok]


# --- control channel: caller -> zygote -------------------------------------------------------


class Spawn(msgspec.Struct, tag="spawn", frozen=True, forbid_unknown_fields=True):
    """Start one confined child. Three fds ride along: step channel, stdout pipe, stderr pipe."""

    request_id: int
    runtime: Runtime
    limits: Limits


class Kill(msgspec.Struct, tag="kill", frozen=True, forbid_unknown_fields=True):
    """Kill a child of the zygote (and everything it started). Ignored once it has been reaped."""

    pid: int


# --- control channel: zygote -> caller -------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", frozen=True, forbid_unknown_fields=True):
    zygote_pid: int
    capabilities: Capabilities


class Spawned(msgspec.Struct, tag="spawned", frozen=True, forbid_unknown_fields=True):
    request_id: int
    pid: int
    uid: int  # the slot's host uid: every process of the step runs as it


class SpawnFailed(msgspec.Struct, tag="spawn_failed", frozen=True, forbid_unknown_fields=True):
    request_id: int
    message: str


class Exited(msgspec.Struct, tag="exited", frozen=True, forbid_unknown_fields=True):
    """A child was reaped. `status` is the raw wait status; `oom_killed` and `pids_limited`
    (a fork refused at the pids limit) come from its cgroups."""

    pid: int
    status: int
    cpu_s: float
    max_rss_kb: int
    oom_killed: bool
    pids_limited: bool = False


ToZygote = Spawn | Kill
FromZygote = Hello | Spawned | SpawnFailed | Exited


# --- step channel ----------------------------------------------------------------------------


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """The child is confined and waits for its one step. `layers` are the layers it applied."""

    layers: list[str]


class StepContext(msgspec.Struct, frozen=True):
    execution_id: str = ""
    step: str = ""
    attempt: int = 1


NIL = msgspec.Raw(b"\xc0")  # msgpack nil: the output of a step that failed


class StepRequest(msgspec.Struct, tag="request", frozen=True):
    """One step for one child. `input` is a msgpack value passed through undecoded.

    For python steps `code_cache` may carry the marshalled code object that an earlier child
    compiled from the same source (the caller never compiles customer code itself); with
    `want_code_cache` the child sends a `Compiled` frame before running the step.
    """

    filename: str
    source: str
    context: StepContext = StepContext()
    env: dict[str, str] = {}
    argv: list[str] = []
    code_cache: bytes | None = None
    want_code_cache: bool = False
    output_max: int = 128 * 1024 * 1024
    # The step's dependency bundle as the step sees it (read-only), "" for none: Python puts
    # `<bundle>/python` on sys.path, JavaScript resolves require() in `<bundle>/node_modules`.
    bundle: str = ""
    # Last, so that a large input can follow the rest of its frame uncopied (frame_buffers).
    input: msgspec.Raw = NIL


class StepError(msgspec.Struct, frozen=True):
    type: ErrorType
    message: str


class Compiled(msgspec.Struct, tag="compiled", frozen=True):
    """The marshalled code object of a python step, sent right after compiling and before any
    of the step's code runs: the only moment the frame cannot have been written by the step."""

    code: bytes


class Log(msgspec.Struct, tag="log", frozen=True):
    """`ctx.log` lines, sent as they are written (between the request and the result, from any
    thread of the step under one lock). The caller keeps them whatever way the step ends, and
    puts the result's own `logs` after them: a runtime that streams sends there only what it
    did not stream (such as a line saying how many were cut)."""

    lines: list[str]


class StepResult(msgspec.Struct, tag="result", frozen=True):
    ok: bool
    error: StepError | None = None
    logs: list[str] = []
    duration_s: float = 0.0
    # Last, so that a large output can follow the rest of its frame uncopied (frame_buffers).
    output: msgspec.Raw = NIL


ToChild = StepRequest
FromChild = Ready | Compiled | Log | StepResult

_encoder = msgspec.msgpack.Encoder()
_to_zygote: msgspec.msgpack.Decoder[ToZygote] = msgspec.msgpack.Decoder(ToZygote)
_from_zygote: msgspec.msgpack.Decoder[FromZygote] = msgspec.msgpack.Decoder(FromZygote)
_to_child: msgspec.msgpack.Decoder[ToChild] = msgspec.msgpack.Decoder(ToChild)
_from_child: msgspec.msgpack.Decoder[FromChild] = msgspec.msgpack.Decoder(FromChild)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def encode_frame(message: msgspec.Struct) -> bytearray:
    """Header and message in one buffer, encoded in place: a payload of many MB is copied
    once here, not once more to put the header in front of it."""
    frame = bytearray(FRAME_HEADER.size)
    _encoder.encode_into(message, frame, FRAME_HEADER.size)
    FRAME_HEADER.pack_into(frame, 0, len(frame) - FRAME_HEADER.size)
    return frame


def frame_buffers(message: StepRequest | StepResult) -> list[bytes | bytearray | msgspec.Raw]:
    """A step message's frame as buffers to send one after the other. A large payload (a
    request's input, a result's output: the struct's last field, a Raw) goes as it is, not
    copied into the frame: the frame of the message with a nil payload ends with that nil's
    one byte, which the payload replaces."""
    name = "input" if isinstance(message, StepRequest) else "output"
    payload: msgspec.Raw = getattr(message, name)
    if len(payload) <= SPLIT_PAYLOAD_BYTES:
        return [encode_frame(message)]  # one copy costs less than a second write
    head = encode_frame(msgspec.structs.replace(message, **{name: NIL}))
    if head[-1:] != bytes(NIL):
        raise ProtocolError(f"{type(message).__name__}.{name} must be its last field")
    del head[-1]
    FRAME_HEADER.pack_into(head, 0, len(head) - FRAME_HEADER.size + len(payload))
    return [head, payload]


def decode_to_zygote(data: Buffer) -> ToZygote:
    return _decode(_to_zygote, data)


def decode_from_zygote(data: Buffer) -> FromZygote:
    return _decode(_from_zygote, data)


def decode_to_child(data: Buffer) -> ToChild:
    return _decode(_to_child, data)


def decode_from_child(data: Buffer) -> FromChild:
    return _decode(_from_child, data)


def _decode(decoder: msgspec.msgpack.Decoder[T], data: Buffer) -> T:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable message: {exc}") from exc


def frame_length(header: Buffer, max_len: int) -> int:
    """Length announced by a frame header; refuses frames over `max_len` before reading them."""
    length: int = FRAME_HEADER.unpack(header)[0]
    if length > max_len:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_len}")
    return length


def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    """Blocking read of exactly `size` bytes, straight into the buffer it returns (decoders
    take a bytearray as they take bytes); EOF before that is a protocol error."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ProtocolError(f"channel closed after {got} of {size} bytes")
        got += n
    return buffer


def read_frame(sock: socket.socket, max_len: int) -> bytearray:
    """Blocking read of one frame's payload (used on the child side)."""
    length = frame_length(recv_exactly(sock, FRAME_HEADER.size), max_len)
    return recv_exactly(sock, length)
