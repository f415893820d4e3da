"""The zygote: a small single-threaded process that forks one confined child per step.

Started by exec with an empty environment (so /proc/<pid>/environ of every child is empty too)
and never given a secret, step code or step data: the caller sends those to each child over the
child's own channel. The zygote only hears "spawn a child with these limits" (the child's three
fds riding along with SCM_RIGHTS), "kill that pid", and reports children started and reaped.

The loop waits on two fds: the control socket and the wakeup pipe that the SIGCHLD/SIGTERM
handlers write to (signal.set_wakeup_fd). Handlers record, the loop acts.
"""

from __future__ import annotations

import argparse
import asyncio  # noqa: F401 - imported so that every child starts with it loaded
import contextlib
import dataclasses
import gc
import json  # noqa: F401 - the same, for exec steps
import os
import select
import shutil
import signal
import socket
import subprocess  # noqa: F401 - the same, for exec steps
import sys
from collections import deque
from typing import NoReturn

from sandbox import child, protocol, syscalls
from sandbox.errors import ProtocolError
from sandbox.layers import ChildPlan, cgroups, mounts, namespaces, userns
from sandbox.probe import Probed, probe
from sandbox.protocol import Exited, Hello, Kill, Limits, Spawn, Spawned, SpawnFailed
from sandbox.runtimes import node

MB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ZygoteConfig:
    uid_base: int
    slots: int
    node_path: str
    tmp_root: str
    node_flags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ChildRecord:
    slot: int
    uid: int
    tmpdir: str | None  # a per-slot directory to remove after exit, when no tmpfs is mounted


class Zygote:
    def __init__(self, control: socket.socket, config: ZygoteConfig, probed: Probed) -> None:
        self.control = control
        self.config = config
        self.probed = probed
        self.available = frozenset(probed.capabilities.available())
        # First in, first out: a slot just freed is used last, which gives the kernel time to
        # finish tearing down its previous child's namespaces and cgroup charges.
        self.free_slots = deque(range(config.slots))
        self.slot_limits: dict[tuple[str, int], int] = {}  # (controller, slot) -> limit set
        # (controller, slot) -> limit hits counted so far. One child at a time uses a slot, so
        # the count at its start is the count at its predecessor's reap: read once per exit.
        # Unless the predecessor's leftovers can outlive it (no pid namespace to end them, no
        # uid of their own to kill them by): then the count is taken again at each start.
        self.slot_hits: dict[tuple[str, int], int | None] = {}
        self.leftovers_outlive = "pidns" not in self.available and "uid_drop" not in self.available
        self.children: dict[int, ChildRecord] = {}
        self.stopping = False
        self.network = namespaces.StepNetwork() if "netns" in self.available else None
        self.keep_paths = mounts.runtime_paths(config.node_path)

    # --- lifecycle -------------------------------------------------------------------------

    def run(self, wakeup: int) -> None:
        self.send(Hello(os.getpid(), self.probed.capabilities))
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(wakeup, select.POLLIN)
        while not self.stopping:
            for fd, _ in poller.poll():
                if fd == wakeup:
                    os.read(wakeup, 512)
                    self.reap()
                else:
                    self.handle_control()
        self.shutdown()

    def request_stop(self) -> None:
        self.stopping = True

    def handle_control(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.control, protocol.CONTROL_PACKET_MAX, 3)
        except OSError:
            data, fds = b"", []
        if not data:
            self.stopping = True  # the caller is gone: nothing may outlive it
            return
        try:
            message = protocol.decode_to_zygote(data)
        except ProtocolError as exc:
            _close_all(fds)
            print(f"zygote: dropped a control message: {exc}", file=sys.stderr)
            return
        if isinstance(message, Spawn):
            self.spawn(message, fds)
        else:
            _close_all(fds)
            self.kill(message)

    def shutdown(self) -> None:
        for pid in list(self.children):
            _kill(pid)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.release(pid)
        for controller in self.probed.controllers:
            cgroups.remove(controller)
        shutil.rmtree(self.config.tmp_root, ignore_errors=True)

    def send(self, message: protocol.FromZygote) -> None:
        try:
            self.control.send(protocol.encode(message))
        except OSError:
            self.stopping = True

    # --- children --------------------------------------------------------------------------

    def spawn(self, request: Spawn, fds: list[int]) -> None:
        if len(fds) != 3 or not self.free_slots:
            _close_all(fds)
            reason = "no free child slot" if len(fds) == 3 else "a spawn needs exactly three fds"
            self.send(SpawnFailed(request.request_id, reason))
            return
        slot = self.free_slots.popleft()
        uid = self.config.uid_base + slot
        plan = self.plan(request, slot, uid, fds)
        go_read, go_write = os.pipe()
        try:
            pid = self.clone(plan)
        except OSError as exc:
            _close_all([*fds, go_read, go_write])
            self.free_slots.append(slot)
            self.send(SpawnFailed(request.request_id, f"clone: {exc.strerror}"))
            return
        if pid == 0:
            os.close(go_write)
            child.main(plan, go_read)
        _close_all([*fds, go_read])
        tmpdir = None if "mountns" in plan.layers else plan.tmpdir
        self.children[pid] = ChildRecord(slot, uid, tmpdir)
        try:
            self.set_up_from_parent(pid, plan)
            os.write(go_write, child.GO)
        except OSError as exc:
            _kill(pid)  # reaped like any child; the caller hears SpawnFailed first
            self.send(SpawnFailed(request.request_id, f"child setup: {exc.strerror or exc}"))
            return
        finally:
            os.close(go_write)
        self.send(Spawned(request.request_id, pid, uid))

    def clone(self, plan: ChildPlan) -> int:
        flags = namespaces.clone_flags(plan.layers)
        if self.network is None or not plan.limits.network:
            return syscalls.clone(flags)
        return self.network.clone_in_host_network(flags)

    def plan(self, request: Spawn, slot: int, uid: int, fds: list[int]) -> ChildPlan:
        limits = request.limits
        layers = set(self.available)
        if limits.network:
            layers.discard("netns")
        if "mountns" in layers:
            tmpdir = mounts.TMPDIR
        else:
            tmpdir = os.path.join(self.config.tmp_root, f"slot-{slot}")
            _make_private_dir(tmpdir, uid if "uid_drop" in layers else -1)
        return ChildPlan(
            runtime=request.runtime,
            limits=limits,
            uid=uid,
            layers=frozenset(layers),
            seccomp_program=self.probed.seccomp_programs.get(limits.network, b""),
            tmpdir=tmpdir,
            channel_fd=fds[0],
            stdout_fd=fds[1],
            stderr_fd=fds[2],
            node_path=self.config.node_path,
            node_flags=self.config.node_flags,
            keep_paths=self.keep_paths,
        )

    def set_up_from_parent(self, pid: int, plan: ChildPlan) -> None:
        """The parent's half of confinement, done before the child may run: id maps, cgroups."""
        if "userns" in plan.layers:
            userns.write_id_maps(pid, plan.uid if "uid_drop" in plan.layers else os.geteuid())
        record = self.children[pid]
        for controller in self.probed.controllers:
            limit = _cgroup_limit(controller.name, plan.limits)
            key = (controller.name, record.slot)
            if self.slot_limits.get(key) != limit:
                cgroups.prepare_slot(controller, record.slot, limit)  # writing it costs a reclaim
                self.slot_limits[key] = limit
                self.slot_hits[key] = cgroups.limit_hits(controller, record.slot)
            elif self.leftovers_outlive:
                self.slot_hits[key] = cgroups.limit_hits(controller, record.slot)
            cgroups.attach(controller, record.slot, pid)

    def kill(self, message: Kill) -> None:
        if message.pid in self.children:  # never signal a pid that is not (or no longer) ours
            _kill(message.pid)

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            record = self.children.get(pid)
            if record is None:
                continue
            # After release: its sweep of the slot's leftovers (no pid namespace) is done, so
            # what they hit counts for this child, never for the slot's next one.
            self.release(pid)
            hit = {c.name: self.hit_limit(c, record.slot) for c in self.probed.controllers}
            oom_killed, pids_limited = hit.get("memory", False), hit.get("pids", False)
            cpu_s = usage.ru_utime + usage.ru_stime
            self.send(Exited(pid, status, cpu_s, usage.ru_maxrss, oom_killed, pids_limited))

    def release(self, pid: int) -> None:
        """Make a dead child's slot clean for the next one, then free it."""
        record = self.children.pop(pid)
        if "pidns" not in self.available and "uid_drop" in self.available:
            _kill_all_of_uid(record.uid)  # without a pid namespace, leftovers outlive the child
        if "mountns" not in self.available and "uid_drop" in self.available:
            # Without private temp dirs, what the step left in the host's goes with it.
            for directory in mounts.TEMP_DIRS:
                _remove_owned_by(directory, record.uid)
        if record.tmpdir is not None:
            shutil.rmtree(record.tmpdir, ignore_errors=True)
        self.free_slots.append(record.slot)

    def hit_limit(self, controller: cgroups.Controller, slot: int) -> bool:
        """Did the slot's cgroup for `controller` hit its limit since the last look?"""
        hits = cgroups.limit_hits(controller, slot)
        if hits is None:
            return False  # unreadable now: keep the count we had, judge the next exit by it
        key = (controller.name, slot)
        before, self.slot_hits[key] = self.slot_hits.get(key), hits
        return before is not None and hits > before


def _cgroup_limit(controller: str, limits: Limits) -> int:
    return limits.memory_mb * MB if controller == "memory" else limits.pids


def _make_private_dir(path: str, uid: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    if uid >= 0:
        os.chown(path, uid, uid)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _kill_all_of_uid(uid: int) -> None:
    """kill(-1) as `uid` reaches every process of that uid and nothing else (kill(2)); again
    until none is left, in case a fork bomb forked while the first sweep went by."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(100):
                os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass  # ESRCH: nothing of that uid is left
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _remove_owned_by(directory: str, uid: int, budget: int = 10_000) -> None:
    """Delete everything `uid` owns under `directory` (it can only have written to
    world-writable places), without following symlinks, visiting at most `budget` entries."""
    stack = [directory]
    while stack and budget > 0:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            budget -= 1
            try:
                owned = entry.stat(follow_symlinks=False).st_uid == uid
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if owned and is_dir:
                shutil.rmtree(entry.path, ignore_errors=True)
            elif owned:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif is_dir:
                stack.append(entry.path)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _parse_args(argv: list[str]) -> tuple[int, ZygoteConfig]:
    parser = argparse.ArgumentParser(prog="sandbox.zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--uid-base", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--node", default="")
    parser.add_argument("--tmp-root", required=True)
    args = parser.parse_args(argv)
    return args.control_fd, ZygoteConfig(args.uid_base, args.slots, args.node, args.tmp_root)


def main(argv: list[str] | None = None) -> NoReturn:
    control_fd, config = _parse_args(sys.argv[1:] if argv is None else argv)
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the caller
    # Orphans of a step (no pid namespace to hold them) are reparented here and reaped by the
    # loop, instead of staying zombies of the slot uid under a PID 1 that may not reap.
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
    os.chdir("/")
    if os.geteuid() == 0:
        os.setgroups([])  # children must not inherit root's supplementary groups
    os.makedirs(config.tmp_root, exist_ok=True)
    os.chmod(config.tmp_root, 0o711)  # slot uids may pass through to their own 0700 dirs
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop through the pipe
    control = socket.socket(fileno=control_fd)
    config = dataclasses.replace(config, node_flags=node.supported_flags(config.node_path))
    probed = probe(config.uid_base + config.slots, os.getpid())
    zygote = Zygote(control, config, probed)
    signal.signal(signal.SIGTERM, lambda *_: zygote.request_stop())
    # Everything loaded so far lives as long as the zygote: out of the collector's sight, a
    # collection in the zygote or in a child never walks it, which would copy every page.
    gc.collect()
    gc.freeze()
    zygote.run(wakeup_read)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
