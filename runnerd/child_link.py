"""The link to one confined child: its step channel, its captured stdout and stderr, and how its
end becomes a StepOutcome (a result frame, checked again here, or a death classified). The
step's `ctx.log` lines arrive as Log frames before the result and are kept as they come, so a
step killed before it answers keeps them too.

A child's frames are written by the step's own process, so they are bounded before they are
decoded (sandbox/bounded.py). The wall clock is enforced here, from outside the child: past
`wall_s` the zygote SIGKILLs the child (pid 1 of its pid namespace, so everything it started
dies with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import signal
import socket

import msgspec

from runnerd.messages import StepOutcome
from runnerd.zygote_link import EXIT_WAIT_S, Zygote
from sandbox import bounded, protocol
from sandbox.bounded import DecodeLimitError
from sandbox.errors import ProtocolError
from sandbox.protocol import (
    Compiled,
    Exited,
    Limits,
    Log,
    Ready,
    StepError,
    StepRequest,
    StepResult,
)

MB = 1024 * 1024
RESULT_OVERHEAD = 8 * MB  # logs and framing on top of the output limit
SMALL_FRAME_BYTES = 256 * 1024  # frames up to this size are read into a bytearray
STDIO_GRACE_S = 1.0  # after the result: how long to wait for the last of stdout/stderr
EXIT_GRACE_S = 1.0  # after its result: how long a child may take to exit before it is killed
LOG_LINES_MAX = 1000
LOG_LINE_MAX = 4096
LOG_BYTES_MAX = LOG_LINES_MAX * (LOG_LINE_MAX * 4 + 64)  # all of a step's Log frames together
# What a child may say of its own end once it has its request; the rest only the caller tells.
CHILD_ERROR_TYPES = frozenset({"exception", "fatal", "output_limit", "memory", "protocol"})
ERROR_MESSAGE_MAX = 64 * 1024  # characters of a step's error message kept
# A result frame is the output inside a map (type, ok, error, logs, duration_s, output): one
# level deeper than the output, and a few items plus its log lines more.
FRAME_DEPTH_MAX = bounded.MAX_DEPTH + 1
FRAME_ITEMS_MAX = bounded.MAX_ITEMS + LOG_LINES_MAX + 64


class TailBuffer:
    """Keeps the last `limit` bytes read from a pipe, counting what was cut."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]

    def text(self) -> str:
        return self.data.decode(errors="replace")

    @property
    def truncated(self) -> bool:
        return self.total > len(self.data)


async def _drain(fd: int, tail: TailBuffer) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        while chunk := await reader.read(64 * 1024):
            tail.feed(chunk)
    finally:
        transport.close()


class Child:
    """One confined child, ready for exactly one step."""

    def __init__(self, zygote: Zygote, pid: int, limits: Limits) -> None:
        self.zygote = zygote
        self.pid = pid
        self.limits = limits
        self.uid = -1
        self.layers: list[str] = []
        self.stdout = TailBuffer(limits.stdio_kb * 1024)
        self.stderr = TailBuffer(limits.stdio_kb * 1024)
        self.channel: socket.socket  # non-blocking; read and written with the loop's sock_*
        self.drains: list[asyncio.Task[None]] = []
        self.logs: list[str] = []  # ctx.log lines streamed so far (Log frames), bounded
        self.frame_bytes = 0  # the size of the last frame read

    @classmethod
    async def attach(
        cls,
        zygote: Zygote,
        pid: int,
        limits: Limits,
        channel: socket.socket,
        stdout: int,
        stderr: int,
    ) -> Child:
        child = cls(zygote, pid, limits)
        child.drains = [
            asyncio.create_task(_drain(stdout, child.stdout)),
            asyncio.create_task(_drain(stderr, child.stderr)),
        ]
        channel.setblocking(False)
        child.channel = channel
        return child

    async def read_frame(self, max_len: int) -> protocol.FromChild:
        header = await self._recv_exactly(protocol.FRAME_HEADER.size)
        payload = await self._recv_exactly(protocol.frame_length(header, max_len))
        self.frame_bytes = len(payload)
        return _decode_frame(payload)

    async def _recv_exactly(self, size: int) -> bytearray | mmap.mmap:
        """The socket straight into one buffer of the frame's size: a result of many MB is
        copied once on this side, where a stream reader copies it into its buffer and out
        again. A large frame gets an anonymous mapping, whose pages exist only once bytes
        arrive in them: a step that announces 100 MB and sends nothing holds no memory."""
        loop = asyncio.get_running_loop()
        buffer = bytearray(size) if size <= SMALL_FRAME_BYTES else mmap.mmap(-1, size)
        view = memoryview(buffer)
        try:
            got = 0
            while got < size:
                n = await loop.sock_recv_into(self.channel, view[got:])
                if n == 0:
                    raise asyncio.IncompleteReadError(b"", size)
                got += n
        finally:
            view.release()
        return buffer

    async def wait_ready(self, timeout_s: float) -> StepResult | None:
        """None once the child is confined and waiting; else the sandbox failure it reported."""
        try:
            async with asyncio.timeout(timeout_s):
                message = await self.read_frame(protocol.SMALL_FRAME_MAX)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            ProtocolError,
            DecodeLimitError,
            OSError,
        ) as exc:
            await self.discard()
            reason = "timed out" if isinstance(exc, TimeoutError) else "closed its channel"
            problems = _problems_note(self.zygote.capabilities.problems)
            return sandbox_failure(f"the child {reason} before it was ready{problems}")
        if isinstance(message, Ready):
            self.layers = message.layers
            return None
        await self.discard()
        if isinstance(message, StepResult) and not message.ok and message.error is not None:
            # A layer failed: the child says which, and what the probe found may say why (a
            # runtime path the layer could not keep).
            note = _problems_note(self.zygote.capabilities.problems)
            error = StepError(message.error.type, message.error.message + note)
            return msgspec.structs.replace(message, error=error)
        return sandbox_failure(f"the child sent {type(message).__name__} before it was ready")

    async def run(self, request: StepRequest) -> tuple[StepOutcome, bytes | None]:
        """Send the step, wait for its result under the wall clock; returns the outcome and the
        code cache the child produced, if it was asked for one."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        result: StepResult | None = None
        error: StepError | None = None
        compiled: bytes | None = None
        watch = self.zygote.memory_watch
        if watch is not None:
            watch.add(self.pid, self.uid, self.limits.memory_mb * MB)
        try:
            async with asyncio.timeout(self.limits.wall_s):
                for buffer in protocol.frame_buffers(request):
                    await loop.sock_sendall(self.channel, buffer)
                message = await self._next_frame()
                # Only the first frame may be the code cache: it is sent before the step runs.
                if request.want_code_cache and isinstance(message, Compiled):
                    compiled = message.code
                    message = await self._next_frame()
                frames = log_bytes = 0
                while isinstance(message, Log):  # kept as they come: a late kill loses none
                    # A runtime sends a line a frame, at most LOG_LINES_MAX: past that (in frames
                    # or bytes) the step is writing frames itself, each one this loop's work.
                    frames, log_bytes = frames + 1, log_bytes + self.frame_bytes
                    if frames > LOG_LINES_MAX or log_bytes > LOG_BYTES_MAX:
                        raise ProtocolError("more log frames than ctx.log writes")
                    self._keep_logs(message.lines)
                    message = await self._next_frame()
            if isinstance(message, StepResult):
                result = self._bounded(message)
            else:
                error = StepError("protocol", f"unexpected {type(message).__name__} frame")
        except TimeoutError:
            error = StepError(
                "timeout", f"the step ran past its wall-clock limit of {self.limits.wall_s:g} s"
            )
        except ProtocolError as exc:
            error = StepError("protocol", f"the step corrupted its result channel: {exc}")
        except DecodeLimitError as exc:
            error = StepError("output_limit", f"the step's result has {exc}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # no result: the exit status says why
        if result is None:
            self.zygote.kill(self.pid)
            compiled = None
        outcome = await self._finish(result, error, loop.time() - started)
        return outcome, compiled

    async def _next_frame(self) -> protocol.FromChild:
        return await self.read_frame(self.limits.output_mb * MB + RESULT_OVERHEAD)

    def _keep_logs(self, lines: list[str]) -> None:
        room = LOG_LINES_MAX - len(self.logs)
        self.logs += [line[:LOG_LINE_MAX] for line in lines[: max(0, room)]]

    def _bounded(self, result: StepResult) -> StepResult:
        """The child runs the step's code, so its result frame is held to the limits here too."""
        output_max = self.limits.output_mb * MB
        if result.error is not None and result.error.type not in CHILD_ERROR_TYPES:
            # timeout, killed, cpu, sandbox are found out here, never told: a step that says
            # them of itself would raise another alarm than its own.
            message = f"the step reported its own end as {result.error.type!r}"
            return StepResult(ok=False, error=StepError("protocol", message), logs=result.logs)
        if result.ok and len(result.output) > output_max:
            message = f"output of {len(result.output)} bytes exceeds the limit of {output_max}"
            return StepResult(ok=False, error=StepError("output_limit", message))
        if result.error is not None and len(result.error.message) > ERROR_MESSAGE_MAX:
            cut = result.error.message[:ERROR_MESSAGE_MAX] + " [cut]"
            result = msgspec.structs.replace(result, error=StepError(result.error.type, cut))
        if len(result.logs) > LOG_LINES_MAX or any(
            len(line) > LOG_LINE_MAX for line in result.logs
        ):
            logs = [line[:LOG_LINE_MAX] for line in result.logs[:LOG_LINES_MAX]]
            return msgspec.structs.replace(result, logs=logs)
        return result

    async def _finish(
        self, result: StepResult | None, error: StepError | None, elapsed_s: float
    ) -> StepOutcome:
        self.channel.close()
        watch = self.zygote.memory_watch
        if watch is not None and watch.remove(self.pid):
            result, error = None, self._memory_error()
        if result is not None and self.zygote.children_clean_up_themselves():
            # Its pid namespace and private /tmp die with it: nothing of it can reach the next
            # step, so the result goes back now and the exit is only watched (killed if late).
            self.zygote.reap_later(self.pid, EXIT_GRACE_S)
        else:
            # Otherwise the step is over once its child is reaped and its slot cleaned
            # (leftovers killed, temp files removed): only then may the next step start.
            exited = await self.zygote.exited(self.pid, EXIT_GRACE_S)
            if exited is None:
                self.zygote.kill(self.pid)
                exited = await self.zygote.exited(self.pid, EXIT_WAIT_S)
            if result is None and error is None:
                error = self._classify_death(exited)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STDIO_GRACE_S):
                await asyncio.gather(*self.drains, return_exceptions=True)
        for task in self.drains:
            task.cancel()
        if result is None:
            result = StepResult(ok=False, error=error, duration_s=elapsed_s)
        self._keep_logs(result.logs)  # after the streamed lines: what was not streamed
        return StepOutcome(
            ok=result.ok,
            output=result.output,
            error=result.error,
            duration_s=result.duration_s,
            logs=self.logs,
            stdout=self.stdout.text(),
            stderr=self.stderr.text(),
            stdout_truncated=self.stdout.truncated,
            stderr_truncated=self.stderr.truncated,
            layers=self.layers,
        )

    def _classify_death(self, exited: Exited | None) -> StepError:
        if exited is None:
            return StepError("sandbox", "the child's exit was never reported")
        status = exited.status
        if exited.oom_killed or self._node_out_of_memory():
            return self._memory_error()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            # A handler-less pid 1 ignores SIGXCPU, so the hard limit's SIGKILL is what ends it:
            # the CPU time used tells a CPU-limit death from any other kill.
            if sig == signal.SIGXCPU or exited.cpu_s >= self.limits.cpu_s:
                return StepError("cpu", f"the step used up its CPU limit of {self.limits.cpu_s} s")
            return StepError("killed", f"the step was killed by {signal.Signals(sig).name}")
        code = os.WEXITSTATUS(status)
        return StepError("protocol", f"the step exited (status {code}) without sending a result")

    def _memory_error(self) -> StepError:
        return StepError(
            "memory", f"the step exceeded its memory limit of {self.limits.memory_mb} MB"
        )

    def _node_out_of_memory(self) -> bool:
        tail = self.stderr.text()
        return "heap out of memory" in tail or "Fatal process out of memory" in tail

    async def discard(self) -> None:
        """Kill an unused child and release what it holds."""
        self.zygote.kill(self.pid)
        self.zygote.forget(self.pid)
        self.channel.close()
        for task in self.drains:
            task.cancel()


class _ResultHead(msgspec.Struct, tag="result"):
    """A result frame with everything but `ok` left undecoded: what its parts weigh."""

    ok: bool
    error: msgspec.Raw = msgspec.Raw(b"")
    logs: msgspec.Raw = msgspec.Raw(b"")


class _LogHead(msgspec.Struct, tag="log"):
    lines: msgspec.Raw = msgspec.Raw(b"")


_Head = _ResultHead | _LogHead | Ready | Compiled
_head_decoder: msgspec.msgpack.Decoder[_Head] = msgspec.msgpack.Decoder(_Head)


def _decode_frame(payload: protocol.Buffer) -> protocol.FromChild:
    """A frame from a child is written by the step's own process, so it is walked before msgspec
    builds anything from it (the logs are decoded; skipping a deep output recurses): past the
    bounds it is a DecodeLimitError, malformed a ProtocolError, never an OOM or RecursionError."""
    try:
        items = bounded.check(payload, FRAME_ITEMS_MAX, FRAME_DEPTH_MAX)
        # Logs and error can only pass their bound in a frame larger than it.
        head = _head_decoder.decode(payload) if len(payload) > RESULT_OVERHEAD else None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable message: {exc}") from exc
    except DecodeLimitError as exc:
        # Past the frame's bounds the result is past the output's too: say those, the ones
        # documented (the frame's own are theirs plus the envelope).
        limit = bounded.MAX_ITEMS if exc.bound == "items" else bounded.MAX_DEPTH
        raise DecodeLimitError(exc.bound, limit) from exc
    if isinstance(head, _LogHead) or (
        isinstance(head, _ResultHead) and len(head.error) + len(head.logs) > RESULT_OVERHEAD
    ):
        # Counted items say nothing of a string's length: a 120 MB error message is one item,
        # and 1.6 GB once decoded (one astral character makes the whole string 4 bytes a char).
        raise DecodeLimitError("bytes", RESULT_OVERHEAD)
    message = protocol.decode_from_child(payload)
    if items > bounded.MAX_ITEMS and isinstance(message, StepResult):
        bounded.check(message.output)  # near the bound: the output alone, exactly
    return message


def _problems_note(problems: list[str]) -> str:
    """A child that dies before it is ready (node not executable by its uid, a runtime file it
    cannot read) cannot say why itself: what the probe found is the likely reason."""
    return f" (the sandbox probe found: {'; '.join(problems)})" if problems else ""


def sandbox_failure(message: str) -> StepResult:
    return StepResult(ok=False, error=StepError("sandbox", message))
