"""Layer: memory and pids limits from a cgroup per child slot (cgroup v1 or v2).

Stops: a step using more memory than its limit counting page cache, tmpfs and every process it
starts (RLIMIT_AS alone counts address space of one process), and fork bombs across uids.
Needs: a writable cgroup hierarchy for the controller (Fargate mounts /sys/fs/cgroup read-only;
then RLIMIT_AS and RLIMIT_NPROC are what is left). Probe: create this zygote's cgroup directory.

All of this runs in the zygote (root), which attaches each child to its slot's cgroup before
the child is let go; nothing here runs in the child.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from sandbox import syscalls
from sandbox.errors import LayerError

CGROUP_ROOT = "/sys/fs/cgroup"
MB = 1024 * 1024


@dataclass(frozen=True)
class Controller:
    """One controller's directory for this zygote, with the file names of its cgroup version."""

    name: str  # "memory" or "pids"
    directory: str
    limit_file: str
    events_file: str
    event: str  # the line of events_file counting the limit's hits: "oom_kill" or "max"

    def slot_dir(self, slot: int) -> str:
        return os.path.join(self.directory, f"slot-{slot}")


def _own_path(controller: str) -> tuple[str, bool] | None:
    """(mount dir of the controller, is v2) for this process, from /proc/self/cgroup."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in lines:
        if controller in controllers.split(","):
            return os.path.join(CGROUP_ROOT, controller) + path, False
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        unified = next((path for hid, _, path in lines if hid == "0"), None)
        if unified is not None:
            return CGROUP_ROOT + unified, True
    return None


def create(controller: str, owner_pid: int) -> Controller:
    """Make this zygote's directory for `controller`; LayerError when the host does not allow."""
    found = _own_path(controller)
    if found is None:
        raise LayerError(f"cgroup_{controller}", "controller not mounted")
    parent, is_v2 = found
    _remove_stale(parent)
    directory = os.path.join(parent, f"runnerd-{owner_pid}")
    try:
        os.makedirs(directory, exist_ok=True)
        if is_v2:
            # Children of `directory` only get the controller if it is delegated to them.
            with open(os.path.join(directory, "cgroup.subtree_control"), "w") as f:
                f.write(f"+{controller}")
    except OSError as exc:
        raise LayerError(f"cgroup_{controller}", f"{directory}: {exc.strerror}") from exc
    if controller == "memory":
        limit, events = (
            ("memory.max", "memory.events")
            if is_v2
            else ("memory.limit_in_bytes", "memory.oom_control")
        )
        return Controller(controller, directory, limit, events, "oom_kill")
    return Controller(controller, directory, "pids.max", "pids.events", "max")


def prepare_slot(controller: Controller, slot: int, limit: int) -> None:
    path = controller.slot_dir(slot)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, controller.limit_file), "w") as f:
        f.write(str(limit))


def attach(controller: Controller, slot: int, pid: int) -> None:
    syscalls.write_file(os.path.join(controller.slot_dir(slot), "cgroup.procs"), str(pid).encode())


def limit_hits(controller: Controller, slot: int) -> int | None:
    """How often this slot's cgroup hit its limit: OOM kills (memory), refused forks (pids);
    None when the count cannot be read."""
    try:
        fd = os.open(os.path.join(controller.slot_dir(slot), controller.events_file), os.O_RDONLY)
        try:
            text = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(b" ")
        if key == controller.event.encode():
            return int(value)
    return 0


def remove(controller: Controller) -> None:
    """Remove the slot directories and this zygote's directory (all children must be gone)."""
    try:
        entries = os.listdir(controller.directory)
    except OSError:
        return
    for entry in entries:
        if entry.startswith("slot-"):
            _rmdir(os.path.join(controller.directory, entry))
    _rmdir(controller.directory)


def _remove_stale(parent: str) -> None:
    """Remove the directories of zygotes that died without cleaning up (SIGKILL)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name.removeprefix("runnerd-")
        if name.startswith("runnerd-") and pid.isdigit() and not _alive(int(pid)):
            remove(Controller("stale", os.path.join(parent, name), "", "", ""))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmdir(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)
