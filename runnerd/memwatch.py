"""Memory of a step across all its processes, where no memory cgroup can hold it (Fargate).

RLIMIT_AS bounds each process of a step, not the step: six processes under a 64 MB limit may
hold 384 MB, and node's off-heap Buffers live in the headroom its address space needs. Without
`cgroup_memory` every step runs as its slot's own uid, so what that uid holds is the step's: this
watch adds it up every POLL_S and has the zygote kill a step past its limit (the step's error is
then `memory`). A last look is taken when the step ends, so memory still held then is caught
however fast the step was; a spike that rose and fell between two looks can pass (RLIMIT_AS
still holds each single process).

What a uid holds, each shmem file counted once (by st_dev and st_ino):
* the resident memory of its processes (/proc/<pid>/statm);
* shmem no process maps, which is in no RSS and no address space: the memfds and /dev/shm files
  its processes hold open, linked or not (/proc/<pid>/fd; st_blocks of the target). The kernel
  shows another uid's fds only to CAP_SYS_PTRACE (ptrace_may_access), which Docker's and
  Fargate's default set lack (Fargate allows adding it), so without it this part is skipped;
* the files it owns under /dev/shm: a walk through directory fds (no symlink, no path past
  PATH_MAX), bounded: a step owning more than SHM_ENTRIES_MAX entries there, or a directory the
  walk cannot enter or deeper than SHM_DEPTH_MAX, is over its limit (flooding /dev/shm with
  empty files would hide what lies past the walk's budget, and the files' inodes are memory too).
What no look at a uid can find: files unlinked while open behind hidden fds (above), and files
sent over a Unix socket and closed, which only the socket's queue holds (memfd_create itself is
refused by the seccomp filter wherever this watch is the memory limit). They are
shmem all the same, charged to the memory cgroup of the daemon's container (readable where it
is not writable): that cgroup's shmem, less what the scan accounted for (files seen, shmem the
watched processes map, other tmpfs mounts' use), is memory no step can be held to, and past
HIDDEN_SLACK_BYTES it is charged to every watched step. One step hiding memory then fails all
running steps, which is better than the task's OOM; with CAP_SYS_PTRACE only sockets' queues
are left to it.

Cost, measured on the 2-core test host (~100 other processes, /dev/shm nearly empty): one scan
takes ~0.35 ms with 5 step processes (~1.8 % of a core at POLL_S) and ~1.0 ms with 50; reading
fds (with CAP_SYS_PTRACE) adds ~0.3 ms at 50. Most of it is the pass over /proc that the
RSS-only watch made too (~0.2-0.35 and ~0.9 ms); memory.stat, statvfs and the /dev/shm walk add
~0.05 ms, and statm is read rather than status (RssShmem is read only when shmem is missing).
The pause after a scan grows with it, so that the watch never takes more than DUTY_MAX of the
daemon's loop: more processes, fds or /dev/shm entries mean looks further apart, never a
stalled loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

POLL_S = 0.02
DUTY_MAX = 0.2  # the largest share of the daemon's loop the watch may take
MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
SHM_DIR = "/dev/shm"
SHMEM_LINK_PREFIXES = ("/memfd:", SHM_DIR + "/")  # readlink of an fd on a memfd, a /dev/shm file
SHM_ENTRIES_MAX = 256  # entries a step may own under /dev/shm
SHM_OTHER_ENTRIES = 1024  # entries of other owners the walk visits besides the watched uids'
SHM_DEPTH_MAX = 16
HIDDEN_SLACK_BYTES = 32 * MB  # hidden shmem tolerated: the daemon's own, pages in transit
OVER_LIMIT = 1 << 62  # the usage of a uid the walk found past its bounds
CAP_SYS_PTRACE = 19
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
VANISHED = (errno.ENOENT, errno.ENOTDIR)  # removed or replaced while the walk went by: a race


@dataclass
class Watched:
    uid: int
    limit_bytes: int


class MemoryWatch:
    def __init__(self, kill: Callable[[int], None], shm_dir: str = SHM_DIR) -> None:
        self.kill = kill
        self.watched: dict[int, Watched] = {}  # pid of the step's child -> its uid and limit
        self.killed: set[int] = set()
        self.scanner = Scanner(shm_dir)
        self._task: asyncio.Task[None] | None = None

    def add(self, pid: int, uid: int, limit_bytes: int) -> None:
        self.watched[pid] = Watched(uid, limit_bytes)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch())

    def remove(self, pid: int) -> bool:
        """Stop watching; True if the step went past its limit: the watch killed it, or, in a
        last look taken now, it still holds more (a step quicker than POLL_S)."""
        watched = self.watched.pop(pid, None)
        if pid in self.killed:
            self.killed.discard(pid)
            return True
        if watched is None:
            return False
        # All watched uids, so that the shmem of the others is not taken for hidden memory.
        uids = {w.uid for w in self.watched.values()} | {watched.uid}
        return self.scanner.usage(uids).get(watched.uid, 0) > watched.limit_bytes

    async def _watch(self) -> None:
        while self.watched:
            started = time.monotonic()
            usage = self.scanner.usage({w.uid for w in self.watched.values()})
            for pid, watched in list(self.watched.items()):
                if usage.get(watched.uid, 0) > watched.limit_bytes and pid not in self.killed:
                    self.killed.add(pid)
                    self.kill(pid)
            took = time.monotonic() - started
            await asyncio.sleep(max(POLL_S, took * (1 - DUTY_MAX) / DUTY_MAX))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass
class Tally:
    """One scan: bytes per watched uid, and what it accounted for of the container's shmem."""

    uids: set[int]
    usage: dict[int, int] = field(default_factory=dict)
    files: set[tuple[int, int]] = field(default_factory=set)  # (st_dev, st_ino) counted
    files_bytes: int = 0  # of every shmem file counted, whoever owns it
    pids: list[str] = field(default_factory=list)  # the watched uids' processes
    shm_entries: dict[int, int] = field(default_factory=dict)
    walk_budget: int = 0

    def add(self, uid: int, size: int) -> None:
        self.usage[uid] = self.usage.get(uid, 0) + size

    def add_file(self, uid: int | None, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self.files:
            return
        self.files.add(key)
        self.files_bytes += st.st_blocks * 512
        if uid is not None:
            self.add(uid, st.st_blocks * 512)

    def over(self, uid: int) -> None:
        self.usage[uid] = OVER_LIMIT


class Scanner:
    """What each uid holds; what the host allows it to see is found out once."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self.reads_fds = _has_capability(CAP_SYS_PTRACE)
        self.cgroup_stat = _own_memory_stat()
        self.other_tmpfs = [p for p in _tmpfs_mounts() if p != os.path.realpath(shm_dir)]

    def usage(self, uids: set[int]) -> dict[int, int]:
        tally = Tally(uids)
        self._scan_processes(tally)
        self._walk_shm(tally)
        hidden = self._hidden_shmem(tally)
        if hidden > 0:
            for uid in uids:
                tally.add(uid, hidden)
        return {uid: tally.usage.get(uid, 0) for uid in uids}

    def _scan_processes(self, tally: Tally) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            with contextlib.suppress(OSError):
                uid = os.stat(f"/proc/{name}").st_uid  # the euid of the process (proc(5))
                if uid not in tally.uids:
                    continue
                with open(f"/proc/{name}/statm") as f:
                    resident_pages = int(f.read().split()[1])
                tally.add(uid, resident_pages * PAGE)
                tally.pids.append(name)
                if self.reads_fds:
                    _scan_fds(name, uid, tally)

    def _walk_shm(self, tally: Tally) -> None:
        tally.shm_entries = dict.fromkeys(tally.uids, 0)
        tally.walk_budget = SHM_OTHER_ENTRIES + (SHM_ENTRIES_MAX + 1) * len(tally.uids)
        try:
            top = os.open(self.shm_dir, DIRECTORY_FLAGS)
        except OSError:
            return
        try:
            _walk(top, 0, None, tally)
        finally:
            os.close(top)
        # Past its budget the walk has seen more than SHM_ENTRIES_MAX entries of at least one
        # uid (unless the host's own entries filled SHM_OTHER_ENTRIES): that one is the cause.
        for uid, count in tally.shm_entries.items():
            if count > SHM_ENTRIES_MAX:
                tally.over(uid)

    def _hidden_shmem(self, tally: Tally) -> int:
        if self.cgroup_stat is None:
            return 0
        try:
            total = _cgroup_shmem_bytes(self.cgroup_stat)
        except (OSError, ValueError):
            return 0
        elsewhere = sum(_used_bytes(path) for path in self.other_tmpfs)
        unaccounted = total - tally.files_bytes - elsewhere - HIDDEN_SLACK_BYTES
        if unaccounted <= 0:
            return 0  # the usual case, without reading any process's status
        # Shmem the watched processes map is in their resident memory already.
        return max(0, unaccounted - sum(_mapped_shmem_bytes(pid) for pid in tally.pids))


def _mapped_shmem_bytes(pid: str) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0  # gone, or a zombie


def _scan_fds(pid: str, uid: int, tally: Tally) -> None:
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if not os.readlink(f"{fd_dir}/{fd}").startswith(SHMEM_LINK_PREFIXES):
                continue
            st = os.stat(f"{fd_dir}/{fd}")  # the open file itself, even once unlinked
        except OSError:
            continue  # closed meanwhile
        tally.add_file(uid, st)


def _walk(dir_fd: int, depth: int, owner: int | None, tally: Tally) -> None:
    """Count the entries under `dir_fd` (owned by `owner`, if watched), holding one fd per
    level below it (at most SHM_DEPTH_MAX)."""
    for name, entry_owner in _count_entries(dir_fd, owner, tally):
        if tally.walk_budget <= 0:
            return
        if depth >= SHM_DEPTH_MAX:
            if entry_owner is not None:
                tally.over(entry_owner)
            continue
        try:
            child = os.open(name, DIRECTORY_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            _unwalkable(entry_owner, exc, tally)
            continue
        try:
            _walk(child, depth + 1, entry_owner, tally)
        finally:
            os.close(child)


def _count_entries(dir_fd: int, owner: int | None, tally: Tally) -> list[tuple[str, int | None]]:
    """Count the files of one directory; returns its subdirectories, with their watched owner."""
    try:
        names = os.listdir(dir_fd)
    except OSError as exc:
        _unwalkable(owner, exc, tally)
        return []
    subdirs = []
    for name in names:
        if tally.walk_budget <= 0:
            break
        tally.walk_budget -= 1
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        entry_owner = st.st_uid if st.st_uid in tally.uids else None
        if entry_owner is not None:
            tally.shm_entries[entry_owner] += 1
        if stat.S_ISREG(st.st_mode):
            tally.add_file(entry_owner, st)
        elif stat.S_ISDIR(st.st_mode):
            subdirs.append((name, entry_owner))
    return subdirs


def _unwalkable(owner: int | None, exc: OSError, tally: Tally) -> None:
    # A directory removed or replaced meanwhile is a race; anything else (ELOOP: swapped for a
    # symlink after its stat) is done to hide from the walk, and the owner pays for it.
    if owner is not None and exc.errno not in VANISHED:
        tally.over(owner)


def _has_capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _own_memory_stat() -> str | None:
    """memory.stat of this process's memory cgroup (v1 or v2), or None where there is none.
    Inside a container the cgroup may be mounted at the hierarchy's root instead."""
    candidates = []
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                candidates += [f"/sys/fs/cgroup/memory{path}", "/sys/fs/cgroup/memory"]
            elif hierarchy == "0":
                candidates += [f"/sys/fs/cgroup{path}", "/sys/fs/cgroup"]
    for directory in candidates:
        path = os.path.join(directory, "memory.stat")
        with contextlib.suppress(OSError, ValueError):
            _cgroup_shmem_bytes(path)
            return path
    return None


def _cgroup_shmem_bytes(path: str) -> int:
    """Shmem charged to the cgroup and below it: `total_shmem` (v1), `shmem` (v2)."""
    found: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key in ("shmem", "total_shmem"):
                found[key] = int(value)
    if not found:
        raise ValueError(f"{path} has no shmem line")
    return found.get("total_shmem", found.get("shmem", 0))


def _tmpfs_mounts() -> list[str]:
    points = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "tmpfs":
                points.append(fields[4].encode().decode("unicode_escape"))
    return sorted(set(points))


def _used_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize
