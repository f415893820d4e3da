"""Slot clean-up off the zygote's loop: a process of its own that makes a dead child's slot fit
for the next child, so that one step's mess (300k files in its temp dir) never holds up the
zygote, which forks every other step.

Only profiles without a pid namespace or without a filesystem view leave anything behind (a
step's leftover processes, its files in its per-slot temp dir and in the host's writable
directories); the full profile never needs this. A slot is handed back to the zygote as soon as
nothing of its step can reach the next one: the uid's processes killed, its own temp dir taken
out of reach, everything the uid owns in the writable directories deleted or, for a directory,
taken out of reach at once (owned by root, mode 000) and deleted after the reply.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
from typing import NoReturn

import msgspec

from sandbox import syscalls
from sandbox.writable import CLEAN_ENTRIES_MAX

PACKET_MAX = 64 * 1024


class CleanSlot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    slot: int
    uid: int
    kill_uid: bool  # no pid namespace: the step's processes may outlive it
    tmpdir: str | None  # its per-slot temp dir, when it had no tmpfs of its own
    dirs: list[str]  # writable directories to take back what the uid left in


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CleanSlot)


class Cleaner:
    """The zygote's side: `request` a slot's clean-up, `finished` tells which slots are done."""

    def __init__(self, trash_root: str) -> None:
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            self.socket.close()
            _serve(theirs, trash_root)
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


def _serve(channel: socket.socket, trash_root: str) -> NoReturn:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    deleters: list[int] = []
    count = 0
    while True:
        data = channel.recv(PACKET_MAX)
        if not data:
            break
        job = _decoder.decode(data)
        if job.kill_uid:
            kill_all_of_uid(job.uid)
        deferred = []
        if job.tmpdir is not None:
            count += 1
            deferred += _take_out_of_reach(job.tmpdir, os.path.join(trash_root, f"{count}"))
        for directory in job.dirs:
            deferred += _take_back(directory, job.uid)
        try:
            channel.send(str(job.slot).encode())
        except OSError:
            break  # the zygote is gone; what is deferred is still deleted below
        if deferred:
            deleters.append(_delete_in_background(deferred))
        deleters = [pid for pid in deleters if not _reaped(pid, block=False)]
    for pid in deleters:
        _reaped(pid, block=True)
    os._exit(0)


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


def _lock_away(path: str) -> bool:
    """Make a directory root's with mode 000, through an fd opened without following a link:
    a step running meanwhile under another uid may have swapped the path for a symlink (in a
    world-writable directory without the sticky bit), and chmod(2) would follow it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _take_out_of_reach(path: str, trash: str) -> list[str]:
    """The slot's own temp dir: root's and unreadable at once, renamed, deleted later."""
    if _lock_away(path):
        with contextlib.suppress(OSError):
            os.rename(path, trash)
            return [trash]
    shutil.rmtree(path, ignore_errors=True)
    return []


def _take_back(directory: str, uid: int, budget: int = CLEAN_ENTRIES_MAX) -> list[str]:
    """Everything `uid` owns under `directory`: files deleted, directories taken out of reach
    (to be deleted later); without following symlinks, visiting at most `budget` entries."""
    deferred = []
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
                if _lock_away(entry.path):
                    deferred.append(entry.path)
                else:
                    shutil.rmtree(entry.path, ignore_errors=True)
            elif owned:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif is_dir and _enterable(entry):
                stack.append(entry.path)
    return deferred


def _enterable(entry: os.DirEntry[str]) -> bool:
    """Could a slot uid have entered it? Only then can it hold the uid's files (directories
    taken out of reach, mode 000, are skipped: walking them again would cost every release)."""
    try:
        return bool(entry.stat(follow_symlinks=False).st_mode & stat.S_IXOTH)
    except OSError:
        return False


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
