"""The link to the zygote process: start it (after claiming the slot uids), ask it for a child,
kill one, hear when one exited. `spawn` hands back the new child's pid and the caller's ends of
its channel and pipes; runnerd/child_link.py takes it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sandbox
from runnerd.errors import SandboxUnavailable
from runnerd.memwatch import MemoryWatch
from runnerd.settings import Settings
from sandbox import protocol, uid_range
from sandbox.errors import ProtocolError
from sandbox.protocol import (
    Capabilities,
    Exited,
    Hello,
    Kill,
    LayerStatus,
    Limits,
    Runtime,
    Spawn,
    Spawned,
    SpawnFailed,
)

T = TypeVar("T")
EXIT_WAIT_S = 5.0  # after a kill: how long the zygote may take to report the exit


@dataclass(frozen=True)
class SandboxOptions:
    uid_base: int = 0  # 0: the first free range (sandbox/uid_range.py)
    slots: int = 256
    node_path: str = ""
    node_fork: bool = True  # JS steps forked from a node zygote (sandbox/node_fork.py)
    python: str = sys.executable
    start_timeout_s: float = 30.0
    bundle_dir: str = ""  # the bundle cache, made visible to steps read-only

    @classmethod
    def from_settings(cls, settings: Settings, bundle_dir: str = "") -> SandboxOptions:
        return cls(
            settings.sandbox_uid_base,
            settings.sandbox_slots,
            settings.node_path,
            settings.node_fork,
            bundle_dir=bundle_dir,
        )


@dataclass
class NewChild:
    """A child the zygote started: its pid and slot uid, and the caller's ends of its step
    channel and stdout/stderr pipes."""

    pid: int
    uid: int
    channel: socket.socket
    stdout: int
    stderr: int


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
        self.tmp_root = ""
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
            *([] if options.node_fork else ["--no-node-fork"]),
            *(["--bundle-dir", options.bundle_dir] if options.bundle_dir else []),
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
        zygote.tmp_root = tmp_root
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

    async def spawn(self, runtime: Runtime, limits: Limits) -> NewChild:
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
        return NewChild(spawned.pid, spawned.uid, ours, stdout_read, stderr_read)

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
        if self.tmp_root:
            # The zygote removes it as it ends; not when it was killed.
            shutil.rmtree(self.tmp_root, ignore_errors=True)
        if self.uids is not None:
            self.uids.release()  # only once nothing of ours can still run as them


def _ok(layers: dict[str, LayerStatus], name: str) -> bool:
    return name in layers and layers[name].ok


def _resolve(future: asyncio.Future[T] | None, value: T) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any] | None, exc: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(exc)
