"""The async side of the sandbox: start the zygote, get children from it, run one step in each.

`Zygote` owns the zygote process and its control socket (spawn, kill, exit reports).
`Child` is one confined child: its step channel, its captured stdout/stderr, its pid.
`Spawner` is what the rest of runnerd calls: `run_step(StepSpec) -> StepOutcome`, with warm
pools of already-confined children per kind of step (runnerd/pool.py), so that a step's latency
is a frame round trip, not a fork and a confinement.

The wall clock is enforced here, from outside the child: past `wall_s` the zygote SIGKILLs the
child (pid 1 of its pid namespace, so everything it started dies with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import signal
import socket
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

import sandbox
from runnerd.errors import SandboxUnavailable
from runnerd.memwatch import MemoryWatch
from runnerd.messages import StepOutcome
from runnerd.metrics import Metrics
from runnerd.pool import WarmPool
from runnerd.settings import Settings
from sandbox import bounded, protocol, uid_range
from sandbox.bounded import DecodeLimitError
from sandbox.errors import ProtocolError
from sandbox.protocol import (
    Capabilities,
    Compiled,
    Exited,
    Hello,
    Kill,
    LayerStatus,
    Limits,
    Ready,
    Runtime,
    Spawn,
    Spawned,
    SpawnFailed,
    StepContext,
    StepError,
    StepRequest,
    StepResult,
)

T = TypeVar("T")
MB = 1024 * 1024
RESULT_OVERHEAD = 8 * MB  # logs and framing on top of the output limit
SMALL_FRAME_BYTES = 256 * 1024  # frames up to this size are read into a bytearray
STDIO_GRACE_S = 1.0  # after the result: how long to wait for the last of stdout/stderr
EXIT_GRACE_S = 1.0  # after its result: how long a child may take to exit before it is killed
EXIT_WAIT_S = 5.0  # after a kill: how long the zygote may take to report the exit
CODE_CACHE_BYTES_MAX = 64 * MB
LOG_LINES_MAX = 1000
LOG_LINE_MAX = 4096
# A result frame is the output inside a map (type, ok, error, logs, duration_s, output): one
# level deeper than the output, and a few items plus its log lines more.
FRAME_DEPTH_MAX = bounded.MAX_DEPTH + 1
FRAME_ITEMS_MAX = bounded.MAX_ITEMS + LOG_LINES_MAX + 64
POOL_KINDS_MAX = 8  # warm pools kept for this many (runtime, limits) kinds, least recent dropped


@dataclass(frozen=True)
class SandboxOptions:
    uid_base: int = 0  # 0: the first free range (sandbox/uid_range.py)
    slots: int = 256
    node_path: str = ""
    python: str = sys.executable
    start_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SandboxOptions:
        return cls(settings.sandbox_uid_base, settings.sandbox_slots, settings.node_path)


@dataclass(frozen=True)
class StepSpec:
    """One step to run: what the sandbox needs, nothing about executions or Redis."""

    runtime: Runtime
    filename: str
    source: str = ""
    input: bytes | msgspec.Raw = b"\xc0"  # one msgpack value (nil by default)
    limits: Limits = Limits()
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    context: StepContext = StepContext()


class Zygote:
    """The zygote process and the control socket to it."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        control: socket.socket,
        uids: uid_range.Claim | None = None,
    ) -> None:
        self.process = process
        self.control = control
        self.uids = uids
        self.capabilities = Capabilities({})
        self._next_request = 0
        self._spawns: dict[int, asyncio.Future[Spawned]] = {}
        self.memory_watch: MemoryWatch | None = None
        self._exits: dict[int, asyncio.Future[Exited | None]] = {}
        self._hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self._watchers: set[asyncio.Task[None]] = set()
        self.on_exit: Callable[[Exited], None] | None = None  # e.g. to count limit hits
        self.closed = asyncio.Event()

    @classmethod
    async def start(cls, options: SandboxOptions) -> Zygote:
        try:
            # The probe uses one uid past the slots'.
            uids = uid_range.claim(options.uid_base, options.slots + 1)
        except (uid_range.UidRangeTaken, OSError) as exc:
            raise SandboxUnavailable(str(exc)) from exc
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tmp_root = tempfile.mkdtemp(prefix="runnerd-steps-")
        argv = [
            options.python,
            "-E",
            "-s",
            "-m",
            "sandbox.zygote",
            "--control-fd",
            str(theirs.fileno()),
            "--uid-base",
            str(uids.base),
            "--slots",
            str(options.slots),
            "--node",
            options.node_path,
            "--tmp-root",
            tmp_root,
        ]
        # An empty environment: the zygote's initial environment block is every child's too.
        process = await asyncio.create_subprocess_exec(
            *argv,
            env={},
            pass_fds=[theirs.fileno()],
            stdin=asyncio.subprocess.DEVNULL,
            cwd=str(Path(sandbox.__file__).resolve().parent.parent),
        )
        theirs.close()
        zygote = cls(process, ours, uids)
        ours.setblocking(False)
        asyncio.get_running_loop().add_reader(ours.fileno(), zygote._on_readable)
        try:
            async with asyncio.timeout(options.start_timeout_s):
                hello = await zygote._hello
        except (TimeoutError, SandboxUnavailable) as exc:
            await zygote.close()
            raise SandboxUnavailable(f"the sandbox zygote did not start: {exc}") from exc
        zygote.capabilities = hello.capabilities
        layers = hello.capabilities.layers
        if not _ok(layers, "cgroup_memory") and _ok(layers, "uid_drop"):
            zygote.memory_watch = MemoryWatch(zygote.kill)
        return zygote

    def _on_readable(self) -> None:
        try:
            data = self.control.recv(protocol.CONTROL_PACKET_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._on_closed()
            return
        try:
            message = protocol.decode_from_zygote(data)
        except ProtocolError:
            return
        if isinstance(message, Hello):
            _resolve(self._hello, message)
        elif isinstance(message, Spawned):
            _resolve(self._spawns.pop(message.request_id, None), message)
        elif isinstance(message, SpawnFailed):
            _fail(self._spawns.pop(message.request_id, None), SandboxUnavailable(message.message))
        elif isinstance(message, Exited):
            _resolve(self._exit_future(message.pid), message)
            if self.on_exit is not None:
                self.on_exit(message)

    def _on_closed(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.control.fileno())
        gone = SandboxUnavailable("the sandbox zygote exited")
        _fail(self._hello, gone)
        for spawn in self._spawns.values():
            _fail(spawn, gone)
        for exit_report in self._exits.values():
            _resolve(exit_report, None)  # no report will come; waiters see "never reported"
        self.closed.set()

    def _exit_future(self, pid: int) -> asyncio.Future[Exited | None]:
        if pid not in self._exits:
            self._exits[pid] = asyncio.get_running_loop().create_future()
        return self._exits[pid]

    async def spawn(self, runtime: Runtime, limits: Limits) -> Child:
        if self.closed.is_set():
            raise SandboxUnavailable("the sandbox zygote exited")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        self._next_request += 1
        request_id = self._next_request
        future: asyncio.Future[Spawned] = asyncio.get_running_loop().create_future()
        self._spawns[request_id] = future
        try:
            payload = protocol.encode(Spawn(request_id, runtime, limits))
            socket.send_fds(self.control, [payload], [theirs.fileno(), stdout_write, stderr_write])
        finally:
            for fd in (stdout_write, stderr_write):
                os.close(fd)
            theirs.close()
        try:
            spawned = await future
        except BaseException:
            ours.close()
            os.close(stdout_read)
            os.close(stderr_read)
            raise
        child = await Child.attach(self, spawned.pid, limits, ours, stdout_read, stderr_read)
        child.uid = spawned.uid
        return child

    def children_clean_up_themselves(self) -> bool:
        """With a pid and a mount namespace, a child's exit takes all it started and left."""
        layers = self.capabilities.layers
        return _ok(layers, "pidns") and _ok(layers, "mountns")

    def reap_later(self, pid: int, grace_s: float) -> None:
        """Watch a child that sent its result: it must exit within `grace_s` or be killed
        (a step can hold its process past its result, e.g. with an exit handler)."""

        async def watch() -> None:
            if await self.exited(pid, grace_s) is None:
                self.kill(pid)
                await self.exited(pid, EXIT_WAIT_S)

        task = asyncio.create_task(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def is_alive(self) -> bool:
        return not self.closed.is_set() and self.process.returncode is None

    def kill(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            self.control.send(protocol.encode(Kill(pid)))

    async def exited(self, pid: int, timeout_s: float) -> Exited | None:
        future = self._exit_future(pid)
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            return None
        finally:
            if future.done():
                self._exits.pop(pid, None)

    def forget(self, pid: int) -> None:
        """Nobody will wait for this pid's exit report: drop it when it comes."""
        future = self._exit_future(pid)
        if future.done():
            self._exits.pop(pid, None)
        else:
            future.add_done_callback(lambda _: self._exits.pop(pid, None))

    async def close(self) -> None:
        for watcher in list(self._watchers):
            watcher.cancel()  # the zygote kills every child when its socket closes
        if self.memory_watch is not None:
            self.memory_watch.close()
        if not self.closed.is_set():
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.control.fileno())
            self.control.close()  # EOF tells the zygote to kill its children and clean up
            self._on_closed()
        try:
            async with asyncio.timeout(EXIT_WAIT_S):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        if self.uids is not None:
            self.uids.release()  # only once nothing of ours can still run as them


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
            return _sandbox_failure(f"the child {reason} before it was ready{problems}")
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
        return _sandbox_failure(f"the child sent {type(message).__name__} before it was ready")

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
                message = await self.read_frame(self.limits.output_mb * MB + RESULT_OVERHEAD)
                # Only the first frame may be the code cache: it is sent before the step runs.
                if request.want_code_cache and isinstance(message, Compiled):
                    compiled = message.code
                    message = await self.read_frame(self.limits.output_mb * MB + RESULT_OVERHEAD)
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

    def _bounded(self, result: StepResult) -> StepResult:
        """The child runs the step's code, so its result frame is held to the limits here too."""
        output_max = self.limits.output_mb * MB
        if result.ok and len(result.output) > output_max:
            message = f"output of {len(result.output)} bytes exceeds the limit of {output_max}"
            return StepResult(ok=False, error=StepError("output_limit", message))
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
        return StepOutcome(
            ok=result.ok,
            output=result.output,
            error=result.error,
            duration_s=result.duration_s,
            logs=result.logs,
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


class Spawner:
    """Runs steps in the sandbox. One per process; `start()` once, `close()` at the end."""

    def __init__(self, zygote: Zygote, pool_size: int, metrics: Metrics | None = None) -> None:
        self.zygote = zygote
        self.metrics = metrics
        if metrics is not None:
            zygote.on_exit = lambda exited: metrics.child_exited(exited.pids_limited)
        self.pool_size = pool_size
        self._pools: OrderedDict[tuple[Runtime, Limits], WarmPool] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._code_cache: OrderedDict[str, bytes] = OrderedDict()
        self._code_cache_bytes = 0

    @classmethod
    async def start(
        cls, options: SandboxOptions, pool_size: int = 0, metrics: Metrics | None = None
    ) -> Spawner:
        return cls(await Zygote.start(options), pool_size, metrics)

    @property
    def capabilities(self) -> Capabilities:
        return self.zygote.capabilities

    async def run_step(self, step: StepSpec) -> StepOutcome:
        asked = time.perf_counter()
        child = await self._acquire(step.runtime, step.limits)
        if self.metrics is not None:
            self.metrics.spawn_duration.labels(step.runtime).observe(time.perf_counter() - asked)
        if isinstance(child, StepResult):
            return StepOutcome(ok=False, error=child.error)
        key = _code_key(step) if step.runtime == "python" else None
        cached = self._code_cache.get(key) if key else None
        request = StepRequest(
            filename=step.filename,
            source=step.source,
            input=step.input if isinstance(step.input, msgspec.Raw) else msgspec.Raw(step.input),
            context=step.context,
            env=step.env,
            argv=list(step.argv),
            code_cache=cached,
            want_code_cache=key is not None and cached is None,
            output_max=step.limits.output_mb * MB,
        )
        outcome, code_cache = await child.run(request)
        if self.pool_size > 0:
            # Refill only now: a replacement started while the step runs competes with it.
            self._pool(step.runtime, step.limits).refill()
        if key and code_cache:
            self._remember_code(key, code_cache)
        return outcome

    async def _acquire(self, runtime: Runtime, limits: Limits) -> Child | StepResult:
        if self.pool_size > 0:
            child = self._pool(runtime, limits).take()
            if child is not None:
                return child
        return await self._spawn_ready(runtime, limits)

    async def _spawn_ready(self, runtime: Runtime, limits: Limits) -> Child | StepResult:
        try:
            child = await self.zygote.spawn(runtime, limits)
        except SandboxUnavailable as exc:
            return _sandbox_failure(str(exc))
        failure = await child.wait_ready(limits.wall_s)
        return failure if failure is not None else child

    def _pool(self, runtime: Runtime, limits: Limits) -> WarmPool:
        key = (runtime, limits)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = WarmPool(lambda: self._warm(runtime, limits), self.pool_size)
            if len(self._pools) > POOL_KINDS_MAX:
                _, evicted = self._pools.popitem(last=False)
                self._closing.add(asyncio.create_task(evicted.close()))
        self._pools.move_to_end(key)
        return pool

    async def _warm(self, runtime: Runtime, limits: Limits) -> Child | None:
        child = await self._spawn_ready(runtime, limits)
        return child if isinstance(child, Child) else None

    def _remember_code(self, key: str, code: bytes) -> None:
        if len(code) > CODE_CACHE_BYTES_MAX // 8:
            return
        self._code_cache[key] = code
        self._code_cache_bytes += len(code)
        while self._code_cache_bytes > CODE_CACHE_BYTES_MAX:
            _, evicted = self._code_cache.popitem(last=False)
            self._code_cache_bytes -= len(evicted)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self.zygote.close()


def _ok(layers: dict[str, LayerStatus], name: str) -> bool:
    return name in layers and layers[name].ok


def _code_key(step: StepSpec) -> str:
    # The fields as one msgpack array, so each is length-prefixed: hashed one after the other,
    # (source + "x", "y.py") and (source, "xy.py") shared a key, and a step whose name carried
    # the tail of another step's source was handed that step's compiled code.
    return hashlib.sha256(msgspec.msgpack.encode((step.source, step.filename))).hexdigest()


def _decode_frame(payload: protocol.Buffer) -> protocol.FromChild:
    """A frame from a child is written by the step's own process, so it is walked before msgspec
    builds anything from it (the logs are decoded; skipping a deep output recurses): past the
    bounds it is a DecodeLimitError, malformed a ProtocolError, never an OOM or RecursionError."""
    try:
        items = bounded.check(payload, FRAME_ITEMS_MAX, FRAME_DEPTH_MAX)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable message: {exc}") from exc
    except DecodeLimitError as exc:
        # Past the frame's bounds the result is past the output's too: say those, the ones
        # documented (the frame's own are theirs plus the envelope).
        limit = bounded.MAX_ITEMS if exc.bound == "items" else bounded.MAX_DEPTH
        raise DecodeLimitError(exc.bound, limit) from exc
    message = protocol.decode_from_child(payload)
    if items > bounded.MAX_ITEMS and isinstance(message, StepResult):
        bounded.check(message.output)  # near the bound: the output alone, exactly
    return message


def _problems_note(problems: list[str]) -> str:
    """A child that dies before it is ready (node not executable by its uid, a runtime file it
    cannot read) cannot say why itself: what the probe found is the likely reason."""
    return f" (the sandbox probe found: {'; '.join(problems)})" if problems else ""


def _sandbox_failure(message: str) -> StepResult:
    return StepResult(ok=False, error=StepError("sandbox", message))


def _resolve(future: asyncio.Future[T] | None, value: T) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any] | None, exc: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(exc)
