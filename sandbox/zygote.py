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
import time
from collections import deque
from typing import NoReturn

import msgspec

from sandbox import child, node_fork, protocol, rootfs, syscalls, writable
from sandbox.cleaner import Cleaner, CleanSlot, kill_uid_range
from sandbox.errors import ProtocolError
from sandbox.layers import ChildPlan, cgroups, mounts, namespaces, userns, view
from sandbox.node_fork import NodeForkError, NodeForks, NodeZygote
from sandbox.probe import Probed, probe, probe_view
from sandbox.protocol import Exited, Hello, Kill, Limits, Spawn, Spawned, SpawnFailed
from sandbox.runtimes import node

MB = 1024 * 1024
CLEANER_STOP_S = 10.0  # at shutdown: how long the cleaner may take to finish
STRAYS_WAIT_S = 2.0  # at shutdown: how long killed leftovers may take to die


@dataclasses.dataclass(frozen=True)
class ZygoteConfig:
    uid_base: int
    slots: int
    node_path: str
    tmp_root: str
    node_flags: tuple[str, ...] = ()
    node_fork: bool = True
    bundle_dir: str = ""  # the dependency bundle cache, bound read-only into the view


@dataclasses.dataclass(frozen=True)
class ChildRecord:
    slot: int
    uid: int
    tmpdir: str | None  # a per-slot directory to remove after exit, when no tmpfs is mounted


class Zygote:
    def __init__(
        self,
        control: socket.socket,
        config: ZygoteConfig,
        probed: Probed,
        view_root: str = "",
        cleaner: Cleaner | None = None,
    ) -> None:
        self.control = control
        self.config = config
        self.probed = probed
        self.view_root = view_root
        self.cleaner = cleaner
        self.writable_dirs = probed.capabilities.writable_dirs
        self.cleaning: dict[int, Exited] = {}  # slot -> the exit to report once it is clean
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
        self.keep_paths = tuple(
            p for p in rootfs.runtime_paths(config.node_path) if view.under_temp_dir(p)
        )
        self.node: NodeForks | None = None  # where JS steps are forked from, when it works

    # --- lifecycle -------------------------------------------------------------------------

    def run(self, wakeup: int) -> None:
        self.send(Hello(os.getpid(), self.probed.capabilities))
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(wakeup, select.POLLIN)
        if self.cleaner is not None:
            poller.register(self.cleaner.fileno(), select.POLLIN)
        while not self.stopping:
            for fd, _ in poller.poll():
                if fd == wakeup:
                    os.read(wakeup, 512)
                    self.reap()
                elif self.cleaner is not None and fd == self.cleaner.fileno():
                    self.handle_cleaned()
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
        self.stop_node()
        for pid in list(self.children):
            _kill(pid)
        for pid, record in list(self.children.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            job = self.clean_up_job(record)
            if job is not None and self.cleaner is not None:
                self.cleaner.request(job)
        self.children.clear()
        if self.cleaner is not None:
            self.cleaner.close(CLEANER_STOP_S)
        _reap_everything(STRAYS_WAIT_S)
        for controller in self.probed.controllers:
            cgroups.remove(controller)
        if self.view_root:
            # Out of this namespace before the tree under it is removed: the view holds binds.
            with contextlib.suppress(OSError):
                syscalls.umount2(self.view_root, syscalls.MNT_DETACH)
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
            pid = self.fork_node(plan, go_read) or self.clone(plan)
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

    def fork_node(self, plan: ChildPlan, go_read: int) -> int:
        """A JS step forked from a node zygote: its pid, or 0 to clone it here instead (a node
        exec'd per step) when no node zygote serves this plan or the fork failed cleanly."""
        zygote = self.node.for_plan(plan) if plan.runtime == "node" and self.node else None
        if zygote is None:
            return 0
        recipe = node_fork.encode_recipe(plan, namespaces.clone_flags(plan.layers), os.getpid())
        fds = [plan.channel_fd, plan.stdout_fd, plan.stderr_fd, go_read]
        try:
            return zygote.fork(recipe, fds)
        except NodeForkError as exc:
            # No answer: a child may hold these fds already, so they go to no other child.
            assert self.node is not None
            self.node.fail(str(exc))
            print(f"zygote: JS steps now start a node each: {exc}", file=sys.stderr)
            raise OSError(0, str(exc)) from exc
        except OSError as exc:
            print(f"zygote: a JS step starts its own node: {exc}", file=sys.stderr)
        return 0

    def start_node(self) -> None:
        """Start the node zygote for the default limits and fork one child through it that must
        come back confined with every layer it was given; otherwise JS steps start a node
        each. The outcome is in the capabilities doctor shows."""
        if not self.config.node_fork or not self.config.node_path:
            note = "turned off (RUNNERD_NODE_FORK)" if self.config.node_path else "no node"
            self.probed.capabilities = msgspec.structs.replace(
                self.probed.capabilities, node_fork_note=note
            )
            return
        host_net = self.network.host if self.network is not None else -1
        forks = NodeForks(
            self.config.node_path, self.config.node_flags, host_net, self.check_node_fork
        )
        why = node_fork.unsupported(self.available)
        if why:
            forks.broken = f"not forked here: {why}"
        else:
            forks.start(node_fork.heap_mb(Limits().memory_mb))
        self.node = forks if not forks.broken else None
        self.probed.capabilities = msgspec.structs.replace(
            self.probed.capabilities, node_forked=self.node is not None, node_fork_note=forks.broken
        )

    def check_node_fork(self, node: NodeZygote) -> None:
        slot = self.config.slots  # the probe's uid, which no step uses
        uid = self.config.uid_base + slot
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        devnull = os.open(os.devnull, os.O_WRONLY)
        go_read, go_write = os.pipe()
        plan = self.plan(Spawn(0, "node", Limits()), slot, uid, [theirs.fileno(), devnull, devnull])
        pid = 0
        try:
            recipe = node_fork.encode_recipe(plan, namespaces.clone_flags(plan.layers), os.getpid())
            try:
                pid = node.fork(recipe, [theirs.fileno(), devnull, devnull, go_read])
            except OSError as exc:
                raise NodeForkError(str(exc)) from exc
            finally:
                _close_all([devnull, go_read])
                theirs.close()
            if "userns" in plan.layers:
                userns.write_id_maps(pid, uid if "uid_drop" in plan.layers else os.geteuid())
            os.write(go_write, child.GO)
            node_fork.check_ready(ours, plan.layers)
        finally:
            os.close(go_write)
            ours.close()
            if pid > 0:
                _kill(pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)

    def stop_node(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None

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
            view_root=self.view_root,
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
            record = self.children.pop(pid, None)
            if record is None:
                if self.node is not None and self.node.lost(pid):
                    print("zygote: a node zygote died; JS steps start a node each", file=sys.stderr)
                continue
            cpu_s = usage.ru_utime + usage.ru_stime
            self.release(record, Exited(pid, status, cpu_s, usage.ru_maxrss, False, False))

    def release(self, record: ChildRecord, exited: Exited) -> None:
        """Make a dead child's slot fit for the next one, then free it and report the exit.
        What needs more than bookkeeping is done by the cleaner, off this loop."""
        job = self.clean_up_job(record)
        if job is None or self.cleaner is None:
            self.slot_done(record.slot, exited)
            return
        self.cleaning[record.slot] = exited
        self.cleaner.request(job)

    def clean_up_job(self, record: ChildRecord) -> CleanSlot | None:
        kill_uid = "pidns" not in self.available and "uid_drop" in self.available
        # Without a view of its own, what the step left in the host's writable places goes.
        dirs = self.writable_dirs if "uid_drop" in self.available else []
        if not kill_uid and not dirs and record.tmpdir is None:
            return None
        return CleanSlot(record.slot, record.uid, kill_uid, record.tmpdir, dirs)

    def handle_cleaned(self) -> None:
        assert self.cleaner is not None
        try:
            slots = self.cleaner.finished()
        except OSError:
            self.stopping = True  # without its cleaner no slot can be reused safely
            return
        self.reap()  # the leftovers the cleaner killed are ours (a subreaper's) to reap
        for slot in slots:
            exited = self.cleaning.pop(slot, None)
            if exited is not None:
                self.slot_done(slot, exited)

    def slot_done(self, slot: int, exited: Exited) -> None:
        # Only now: the sweep of the slot's leftovers is done, so what they hit counts for
        # this child, never for the slot's next one.
        hit = {c.name: self.hit_limit(c, slot) for c in self.probed.controllers}
        self.free_slots.append(slot)
        exited = msgspec.structs.replace(
            exited, oom_killed=hit.get("memory", False), pids_limited=hit.get("pids", False)
        )
        self.send(exited)

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


def sweep_files_of_range(cleaner: Cleaner, config: ZygoteConfig, dirs: list[str]) -> None:
    """Before the first step: what an earlier instance's steps left in the writable places
    under these uids (it died before it could take it back) goes, as at a slot's release."""
    everyone = config.slots + 1
    cleaner.request(CleanSlot(-1, config.uid_base, False, None, dirs, uid_count=everyone))
    cleaner.finished()


def _reap_everything(timeout_s: float) -> None:
    """Before the zygote exits: the steps' leftovers it killed are its children (it is their
    subreaper); unreaped, they would be handed to whatever reaps above it, as zombies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)


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
    parser.add_argument("--no-node-fork", dest="node_fork", action="store_false")
    parser.add_argument("--bundle-dir", default="")
    args = parser.parse_args(argv)
    config = ZygoteConfig(
        args.uid_base,
        args.slots,
        args.node,
        args.tmp_root,
        node_fork=args.node_fork,
        bundle_dir=args.bundle_dir,
    )
    return args.control_fd, config


def main(argv: list[str] | None = None) -> NoReturn:
    # A Ctrl-C at a terminal reaches its whole foreground group, this process too; when to end
    # is the caller's to decide (it closes the control socket), not a KeyboardInterrupt's here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    probe_uid = config.uid_base + config.slots
    if os.geteuid() == 0:
        kill_uid_range(config.uid_base, config.slots + 1)  # what an earlier instance left
    probed = probe(probe_uid, os.getpid(), config.node_path)
    view_root = os.path.join(config.tmp_root, "view")
    probe_view(probed, view_root, probe_uid, config.node_path, config.bundle_dir)
    has_view = probed.capabilities.layers["fs_view"].ok
    can_clean = "uid_drop" in probed.capabilities.available()
    if not has_view and can_clean:
        found = writable.find_writable_dirs(exclude=(config.tmp_root,))
        probed.capabilities = msgspec.structs.replace(probed.capabilities, writable_dirs=found)
    cleaner = None
    if not has_view or "pidns" not in probed.capabilities.available():
        trash = os.path.join(config.tmp_root, "trash")
        os.makedirs(trash, mode=0o700, exist_ok=True)
        cleaner = Cleaner(trash, probed.capabilities.writable_dirs)
        if can_clean:
            sweep_files_of_range(cleaner, config, probed.capabilities.writable_dirs)
    zygote = Zygote(control, config, probed, view_root if has_view else "", cleaner)
    zygote.start_node()
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
