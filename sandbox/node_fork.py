"""The Python zygote's side of the node zygote: build the addon, start node once, fork through it.

A JavaScript step forked from a warm node costs a few milliseconds instead of a node start
(70-100 ms of CPU). The node zygote (runtimes/node_zygote.cjs, with runtimes/node_fork.c)
is a child of this zygote, in its namespaces, and is told for each JS step what this zygote
would give a Python child: the clone flags, the layers, the rlimits, the seccomp program, the
view. It forks, and the step child is reparented here, so this zygote reaps it, maps its ids,
puts it in its slot's cgroups and says go, as for any child (see sandbox/zygote.py).

Where the addon cannot be built or loaded, or the first fork through it does not come back
confined and Ready, JS steps run as before (a node exec'd per step) and `runnerd doctor` says
why. Decided here, once, when the zygote starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox import protocol
from sandbox.errors import ProtocolError
from sandbox.layers import ALL_LAYERS, ChildPlan, rlimits
from sandbox.protocol import Ready

RUNTIMES = Path(__file__).with_name("runtimes")
SOURCE = RUNTIMES / "node_fork.c"
ZYGOTE_SCRIPT = RUNTIMES / "node_zygote.cjs"
CACHE_DIR = "/run/runnerd"  # root's, as the uid claims are; used when the package is read-only
MAGIC = 0x31464E52  # "RNF1", as RECIPE_MAGIC in node_fork.c
# The heap and compile work of V8 on the main thread only: no platform worker threads, whose
# absence in a forked child would hang whatever waited for them. Large pages: node's code,
# remapped into anonymous huge pages, is copied by a fork as a few page-table entries instead
# of being faulted in again, page by page, by every child (about 15% of a child's CPU here).
NODE_FLAGS = ("--single-threaded", "--v8-pool-size=0", "--use-largepages=silent")
# The zygote's environment is empty; the compiler finds its linker on PATH.
BUILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C"}
REPLY_TIMEOUT_S = 5.0
START_TIMEOUT_S = 15.0
MB = 1024 * 1024


class NodeForkError(Exception):
    """The fork path is unusable: a readable reason, which doctor shows."""


# --- the addon ------------------------------------------------------------------------------


def addon_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return f"node_fork-{digest}.node"


def build(directory: str) -> str:
    """Compile the addon into `directory` (atomically) and return its path. N-API is a stable
    ABI, so one build serves every node version; the name carries the source's hash, so a
    build of other source is never loaded."""
    compiler = shutil.which("cc", path=BUILD_ENV["PATH"])
    if compiler is None:
        raise NodeForkError("no C compiler (cc) to build the node fork addon")
    target = os.path.join(directory, addon_name())
    partial = f"{target}.{os.getpid()}.partial"
    argv = [compiler, "-O2", "-Wall", "-shared", "-fPIC", "-o", partial, str(SOURCE)]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, check=False, env=BUILD_ENV
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeForkError(f"building the node fork addon failed: {exc}") from exc
    if done.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        first = (done.stderr.strip().splitlines() or ["no output"])[0]
        raise NodeForkError(f"building the node fork addon failed: {first}")
    os.chmod(partial, 0o755)
    os.replace(partial, target)
    return target


def locate_or_build() -> str:
    """The addon beside the sources (built there by an image build or an earlier run), else one
    built now, beside the sources when that directory is writable, else under CACHE_DIR."""
    for directory in (str(RUNTIMES), CACHE_DIR):
        path = os.path.join(directory, addon_name())
        if os.path.exists(path):
            _check_trusted(path)
            return path
    for directory in (str(RUNTIMES), CACHE_DIR):
        with contextlib.suppress(OSError):
            os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.access(directory, os.W_OK):
            path = build(directory)
            _check_trusted(path)
            return path
    raise NodeForkError(f"nowhere to build the node fork addon ({RUNTIMES} and {CACHE_DIR})")


def _check_trusted(path: str) -> None:
    """Code every JS child runs: only if no one but its owner (us or root) could have written
    it or replaced it."""
    for item in (path, os.path.dirname(path)):
        info = os.stat(item)
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise NodeForkError(f"{item} is writable by others: not loading the node fork addon")


# --- the recipe -----------------------------------------------------------------------------


def unsupported(layers: frozenset[str]) -> str:
    """Why children with these layers cannot be forked from the node zygote ("" when they
    can). The C recipe covers the two profiles that occur: a filesystem view, or no mount
    namespace at all. Every plan has the mount layers the host has, so the zygote asks once."""
    if "mountns" in layers and "fs_view" not in layers:
        return "a mount namespace without the filesystem view"
    # Runtime files under a temp dir (`keep_paths`: a venv or node in /tmp) are not bound into
    # a forked child's /tmp: its node is loaded already, and it starts no interpreter of them.
    return ""


def encode_recipe(plan: ChildPlan, clone_flags: int, parent_pid: int) -> bytes:
    """The layout node_fork.c `decode_recipe` reads: little-endian u32s, rlimits as
    (u32 resource, u64 soft, u64 hard), then length-prefixed seccomp program, view root and
    the JSON the JavaScript side reads."""
    bits = 0
    for name in plan.layers:
        bits |= 1 << ALL_LAYERS.index(name)
    table = rlimits.table(plan.limits, "node", "cgroup_pids" in plan.layers)
    extra = json.dumps(
        {
            "layers": sorted(plan.layers),
            "tmpdir": plan.tmpdir,
            "output_max": plan.limits.output_mb * MB,
            "pids": plan.limits.pids,
            "network": plan.limits.network,
        }
    ).encode()
    parts = [
        struct.pack(
            "<8I",
            MAGIC,
            clone_flags,
            bits,
            plan.uid,
            parent_pid,
            plan.limits.tmp_mb,
            int(plan.limits.network),
            len(table),
        )
    ]
    for which, value in table:
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        parts.append(struct.pack("<IQQ", which, value, hard))
    for blob in (plan.seccomp_program, plan.view_root.encode(), extra):
        parts.append(struct.pack("<I", len(blob)) + blob)
    return b"".join(parts)


# --- the node zygote ------------------------------------------------------------------------


@dataclass
class NodeZygote:
    """One node zygote, as the Python zygote sees it: node loads and warms the runner, forks
    once and exits; its single-threaded copy, the server, is reparented to the Python zygote
    and serves (see runtimes/node_fork.c). `pid` is the server's."""

    control: socket.socket
    pid: int
    reaped: bool = False

    @classmethod
    def start(
        cls, node_path: str, node_flags: tuple[str, ...], host_net: int, heap_mb: int
    ) -> NodeZygote:
        """Start node with an empty environment; returns once its server said hello."""
        if not node_path:
            raise NodeForkError("no node")
        addon = locate_or_build()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep = [theirs.fileno()] + ([host_net] if host_net >= 0 else [])
        argv = [
            node_path,
            *NODE_FLAGS,
            f"--max-old-space-size={heap_mb}",
            *node_flags,
            str(ZYGOTE_SCRIPT),
            addon,
            str(theirs.fileno()),
            str(host_net),
        ]
        try:
            process = subprocess.Popen(
                argv, env={}, cwd="/", pass_fds=keep, stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            ours.close()
            raise NodeForkError(f"node zygote: {exc.strerror}") from exc
        finally:
            theirs.close()
        try:
            pid = _hello(ours)
        except NodeForkError:
            ours.close()
            process.kill()
            raise
        finally:
            # Reaped here, before the Python zygote's own wait4(-1) could take it: node exits
            # as soon as it has forked its server (or when it failed to).
            process.wait()
        return cls(ours, pid)

    def fork(self, recipe: bytes, fds: list[int]) -> int:
        """Fork one step child; returns its pid. OSError when this one could not be forked;
        NodeForkError when the node zygote is gone or stuck (the caller stops using it)."""
        try:
            socket.send_fds(self.control, [recipe], fds)
            ready, _, _ = select.select([self.control], [], [], REPLY_TIMEOUT_S)
            if not ready:
                raise NodeForkError("the node zygote did not answer a fork")
            reply = self.control.recv(256)
        except OSError as exc:
            raise NodeForkError(f"the node zygote is gone: {exc.strerror or exc}") from exc
        if len(reply) < 4:
            raise NodeForkError("the node zygote is gone")
        pid: int = struct.unpack("<i", reply[:4])[0]
        if pid <= 0:
            message = reply[4:].decode(errors="replace") or os.strerror(-pid)
            raise OSError(-pid, f"node fork: {message}")
        return pid

    def stop(self) -> None:
        self.control.close()  # the server exits when its control socket closes
        if not self.reaped:  # still our unreaped child, so the pid is still the server's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _hello(control: socket.socket) -> int:
    """The server's first message: its pid."""
    ready, _, _ = select.select([control], [], [], START_TIMEOUT_S)
    if not ready:
        raise NodeForkError("the node zygote did not start")
    try:
        hello = control.recv(256)
    except OSError as exc:
        raise NodeForkError(f"the node zygote did not start: {exc.strerror}") from exc
    if len(hello) < 4 or struct.unpack("<i", hello[:4])[0] <= 0:
        raise NodeForkError("the node zygote did not start")
    pid: int = struct.unpack("<i", hello[:4])[0]
    return pid


def heap_mb(memory_mb: int) -> int:
    """V8's heap limit for a step, as a node per step gets it (sandbox/runtimes/node.py)."""
    return max(16, memory_mb * 3 // 4)


class NodeForks:
    """The node zygotes of one Python zygote: one per heap limit in use (V8 fixes the limit
    when node starts), at most ZYGOTES_MAX; steps of further limits start a node each. Each
    new one must pass `check` (a first child, confined and Ready) before it serves. Once one
    fails to start or dies, none is used again: a node per step is the known-good path."""

    ZYGOTES_MAX = 4

    def __init__(
        self,
        node_path: str,
        node_flags: tuple[str, ...],
        host_net: int,
        check: Callable[[NodeZygote], None],
    ) -> None:
        self.node_path, self.node_flags, self.host_net = node_path, node_flags, host_net
        self.check = check
        self.zygotes: dict[int, NodeZygote] = {}
        self.broken = ""  # why the fork path is off, once it is

    def for_plan(self, plan: ChildPlan) -> NodeZygote | None:
        if self.broken:
            return None
        heap = heap_mb(plan.limits.memory_mb)
        zygote = self.zygotes.get(heap)
        if zygote is None and len(self.zygotes) < self.ZYGOTES_MAX:
            zygote = self.start(heap)
        return zygote

    def start(self, heap: int) -> NodeZygote | None:
        zygote = None
        try:
            zygote = NodeZygote.start(self.node_path, self.node_flags, self.host_net, heap)
            self.check(zygote)
        except NodeForkError as exc:
            self.broken = str(exc)
            if zygote is not None:
                zygote.stop()
            return None
        self.zygotes[heap] = zygote
        return zygote

    def fail(self, reason: str) -> None:
        """The fork path is off from now on."""
        self.broken = reason
        self.stop()

    def lost(self, pid: int) -> bool:
        """A reaped pid: was it one of ours? Then the fork path is off."""
        dead = [zygote for zygote in self.zygotes.values() if zygote.pid == pid]
        if not dead:
            return False
        dead[0].reaped = True
        self.fail("a node zygote died")
        return True

    def stop(self) -> None:
        for zygote in self.zygotes.values():
            zygote.stop()
        self.zygotes.clear()


def check_ready(channel: socket.socket, expected_layers: frozenset[str]) -> None:
    """The first forked child must say Ready with exactly the layers it was given."""
    channel.settimeout(START_TIMEOUT_S)
    try:
        message = protocol.decode_from_child(protocol.read_frame(channel, protocol.SMALL_FRAME_MAX))
    except (OSError, ProtocolError) as exc:
        raise NodeForkError(f"the first forked JS child did not start: {exc}") from exc
    if isinstance(message, protocol.StepResult) and message.error is not None:
        raise NodeForkError(f"the first forked JS child failed: {message.error.message}")
    if not isinstance(message, Ready):
        raise NodeForkError("the first forked JS child sent no Ready")
    if frozenset(message.layers) != expected_layers:
        missing = sorted(expected_layers - set(message.layers))
        raise NodeForkError(f"the first forked JS child lacks layers: {', '.join(missing)}")


def main(argv: list[str]) -> int:
    """`python -m sandbox.node_fork build [DIR]`: build the addon ahead of time (an image build
    does, so that a container with a read-only root and no compiler has it)."""
    if not argv or argv[0] != "build" or len(argv) > 2:
        print("usage: python -m sandbox.node_fork build [DIR]", file=sys.stderr)
        return 2
    directory = argv[1] if len(argv) == 2 else str(RUNTIMES)
    try:
        os.makedirs(directory, exist_ok=True)
        print(build(directory))
    except (NodeForkError, OSError) as exc:
        print(f"sandbox.node_fork: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
