"""Slot clean-up off the zygote's loop: a process of its own that makes a dead child's slot fit
for the next child, so that one step's mess (300k files in its temp dir) never holds up the
zygote, which forks every other step.

Only profiles without a pid namespace or without a filesystem view leave anything behind (a
step's leftover processes, its files in its per-slot temp dir and in the host's writable
directories); the full profile never needs this. A slot is handed back to the zygote as soon as
nothing of its step can reach the next one: the uid's processes killed, its own temp dir taken
out of reach, everything the uid owns in the writable directories deleted or, for a directory,
taken out of reach at once (renamed into a root-only trash on its filesystem) and deleted
after the reply. Everything is done through directory fds opened without following a link:
other steps run meanwhile, and may swap any name in a world-writable directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from typing import NoReturn

import msgspec

from sandbox import syscalls
from sandbox.writable import CLEAN_ENTRIES_MAX

DEPTH_MAX = 64  # directory levels a clean-up goes down (one fd open per level)

PACKET_MAX = 64 * 1024


class CleanSlot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    slot: int
    uid: int
    kill_uid: bool  # no pid namespace: the step's processes may outlive it
    tmpdir: str | None  # its per-slot temp dir, when it had no tmpfs of its own
    dirs: list[str]  # writable directories to take back what the uid left in
    uid_count: int = 1  # uid .. uid + uid_count: more than one for the sweep at start


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CleanSlot)


class Cleaner:
    """The zygote's side: `request` a slot's clean-up, `finished` tells which slots are done."""

    def __init__(self, trash_root: str, writable_dirs: list[str]) -> None:
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            self.socket.close()
            _serve(theirs, Trash(trash_root, writable_dirs))
        theirs.close()

    def fileno(self) -> int:
        return self.socket.fileno()

    def request(self, job: CleanSlot) -> None:
        self.socket.send(_encoder.encode(job))

    def finished(self) -> list[int]:
        data = self.socket.recv(PACKET_MAX)
        if not data:
            raise ConnectionError("the slot cleaner exited")
        return [int(slot) for slot in data.split(b",")]

    def close(self, timeout_s: float) -> None:
        """Let the cleaner finish what it deferred (within `timeout_s`), then end it."""
        self.socket.close()
        with contextlib.suppress(ChildProcessError):
            signal.signal(signal.SIGALRM, lambda *_: None)
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                os.waitpid(self.pid, 0)
            except InterruptedError:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)


def _serve(channel: socket.socket, trash: Trash) -> NoReturn:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    deleters: list[int] = []
    while True:
        data = channel.recv(PACKET_MAX)
        if not data:
            break
        job = _decoder.decode(data)
        if job.kill_uid:
            kill_all_of_uid(job.uid)
        uids = set(range(job.uid, job.uid + job.uid_count))
        moved = []
        if job.tmpdir is not None:
            moved += trash.take_path(job.tmpdir)
        for directory in job.dirs:
            moved += _take_back(directory, uids, trash)
        try:
            channel.send(str(job.slot).encode())
        except OSError:
            break  # the zygote is gone; what was moved is still deleted below
        if moved:
            deleters.append(_delete_in_background(moved))
        deleters = [pid for pid in deleters if not _reaped(pid, block=False)]
    for pid in deleters:
        _reaped(pid, block=True)
    trash.remove()
    os._exit(0)


class Trash:
    """Root-only directories, one per filesystem, that what a slot's uid owned is renamed into
    at once: out of every step's reach the moment the slot is handed back, deleted later. A
    rename stays on its filesystem, so each writable place's filesystem gets its own (mkdtemp:
    mode 0700, a name no one could have taken), made only in a root-owned sticky directory,
    where no step can rename it away and put a link in its place; on a filesystem without one,
    what is found is deleted at once (through fds, so still without following a link)."""

    def __init__(self, root: str, writable_dirs: list[str]) -> None:
        self.dirs: dict[int, tuple[str, int]] = {}  # st_dev -> (path, fd)
        self.count = 0
        self._add(root)
        for directory in writable_dirs:
            with contextlib.suppress(OSError):
                info = os.lstat(directory)
                if info.st_dev in self.dirs or info.st_uid != 0:
                    continue
                if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX:
                    self._add(tempfile.mkdtemp(prefix=".runnerd-trash-", dir=directory))

    def _add(self, path: str) -> tuple[str, int]:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.dirs[os.fstat(fd).st_dev] = (path, fd)
        return path, fd

    def move(self, parent_fd: int, name: str) -> list[str]:
        """Rename `name` (in the directory `parent_fd`) into the trash; where that fails,
        delete it now. Both without following a link: nothing here is a path a step can swap."""
        target = self.dirs.get(os.fstat(parent_fd).st_dev)
        if target is not None:
            self.count += 1
            trash_path, trash_fd = target
            new_name = f"{self.count}"
            with contextlib.suppress(OSError):
                os.rename(name, new_name, src_dir_fd=parent_fd, dst_dir_fd=trash_fd)
                return [os.path.join(trash_path, new_name)]
        shutil.rmtree(name, ignore_errors=True, dir_fd=parent_fd)
        return []

    def take_path(self, path: str) -> list[str]:
        """The slot's own temp dir, whose parent only root may write to."""
        parent = os.path.dirname(path)
        try:
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            return self.move(fd, os.path.basename(path))
        finally:
            os.close(fd)

    def is_trash(self, parent_fd: int, name: str) -> bool:
        with contextlib.suppress(OSError):
            info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            return any(
                (info.st_dev, info.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
                for _, fd in self.dirs.values()
            )
        return False

    def remove(self) -> None:
        for path, fd in self.dirs.values():
            os.close(fd)
            shutil.rmtree(path, ignore_errors=True)


def _delete_in_background(paths: list[str]) -> int:
    """Out of reach already, so nothing waits for their deletion: a process of its own does
    it, and the next slot's clean-up is not held up by a directory of 300k files."""
    pid = os.fork()
    if pid == 0:
        os.nice(10)
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        os._exit(0)
    return pid


def _reaped(pid: int, block: bool) -> bool:
    try:
        done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _take_back(directory: str, uids: set[int], trash: Trash) -> list[str]:
    """Everything owned by one of `uids` under `directory`: files unlinked, directories moved
    to the trash. Every step goes through a directory fd opened without following a link, so a
    step running meanwhile (another uid, in a world-writable directory without the sticky bit)
    can swap a name for a symlink and gain nothing: the swapped name is what gets moved or
    unlinked."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    budget = [CLEAN_ENTRIES_MAX]
    try:
        return _take_back_in(fd, directory, uids, trash, budget, DEPTH_MAX)
    finally:
        os.close(fd)


def _take_back_in(
    fd: int, path: str, uids: set[int], trash: Trash, budget: list[int], depth: int
) -> list[str]:
    moved: list[str] = []
    try:
        with os.scandir(fd) as listing:
            entries = list(listing)
    except OSError:
        return moved
    for entry in entries:
        budget[0] -= 1
        if budget[0] < 0:
            break
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            if info.st_uid in uids:
                moved += trash.move(fd, entry.name)
            elif depth > 0 and _may_hold_step_files(info) and not trash.is_trash(fd, entry.name):
                moved += _descend(fd, path, entry.name, uids, trash, budget, depth)
        elif info.st_uid in uids:
            with contextlib.suppress(OSError):
                os.unlink(entry.name, dir_fd=fd)
    return moved


def _may_hold_step_files(info: os.stat_result) -> bool:
    """Could a step have left something below? Not in a directory of root's that other users
    cannot enter (root never lets them in and then out again); any other directory, whatever
    its mode: a step that owns one can let another step write in it and then lock it."""
    return info.st_uid != 0 or bool(info.st_mode & stat.S_IXOTH)


def _descend(
    fd: int, path: str, name: str, uids: set[int], trash: Trash, budget: list[int], depth: int
) -> list[str]:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        child = os.open(name, flags, dir_fd=fd)
    except OSError:
        return []  # swapped for a link, or gone: nothing of ours to follow
    try:
        return _take_back_in(child, os.path.join(path, name), uids, trash, budget, depth - 1)
    finally:
        os.close(child)


def kill_uid_range(first: int, count: int) -> None:
    """At start: a range just claimed may still run an earlier instance's steps (it died
    before it could end them: a SIGKILL, the OOM killer). Every process of those uids goes."""
    for _ in range(100):
        found = False
        for name in os.listdir("/proc"):
            if name.isdigit() and first <= _real_uid(name) < first + count:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(name), signal.SIGKILL)
                found = True
        if not found:
            return
        time.sleep(0.01)


def _real_uid(pid: str) -> int:
    """From status, not the /proc entry's owner: that is root for a non-dumpable process."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def kill_all_of_uid(uid: int) -> None:
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
