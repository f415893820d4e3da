"""Claim the host uids a sandbox gives its child slots, so that no two instances share them.

Without a pid namespace an instance cleans a slot with kill(-1) as the slot's uid, and counts
RLIMIT_NPROC per uid: a second instance (a second worker in the container, `runnerd run-step`
inside a worker's container) using the same uids would kill the first one's steps and share its
process limit. So each instance holds a lock on its range for its life: a file per range in a
root-only directory, locked with flock(2), which the kernel releases when the holder dies (no
stale claims after a SIGKILL). Claims are made under a lock on the directory, so two instances
starting together cannot both take a range.

An operator's explicit range that overlaps a live claim is refused; without one, the first free
range from AUTO_BASE on is taken, in steps of the range's size.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from dataclasses import dataclass

AUTO_BASE = 200_000
AUTO_TRIES = 64
CLAIM_DIRS = ("/run/runnerd", "/var/run/runnerd")
NOBODY = 65534  # never a slot uid: files of unmapped owners show as it


class UidRangeTaken(Exception):
    """The operator's range is held by another live instance (the message says which)."""


@dataclass
class Claim:
    base: int
    count: int
    fd: int  # held open (and locked) for the life of the instance; -1 when nothing to hold
    path: str = ""

    def release(self) -> None:
        """Unlink, then unlock: a claimer that opened the file before the unlink finds it
        unlocked afterwards and takes it as stale, which it is."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def claim(base: int, count: int) -> Claim:
    """Take `count` uids from `base` (0: the first free range). Only root gives steps uids of
    their own; any other instance runs them as itself, and there is nothing to claim."""
    if os.geteuid() != 0:
        return Claim(base or AUTO_BASE, count, -1)
    directory = _claim_dir()
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        candidates = [base] if base else [AUTO_BASE + i * count for i in range(AUTO_TRIES)]
        for start in candidates:
            if start <= NOBODY < start + count:
                continue
            holder = _live_overlap(directory, start, count)
            if holder is None:
                path = os.path.join(directory, _name(start, count))
                return Claim(start, count, _hold(path), path)
            if base:
                raise UidRangeTaken(
                    f"sandbox uids {start}..{start + count - 1} overlap {holder}, held by "
                    "another runnerd on this machine: give each instance its own "
                    "RUNNERD_SANDBOX_UID_BASE, or leave it unset to pick a free range"
                )
        raise UidRangeTaken(f"no free range of {count} sandbox uids from {AUTO_BASE} on")
    finally:
        os.close(lock)


def _claim_dir() -> str:
    for directory in CLAIM_DIRS:
        with contextlib.suppress(OSError):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            info = os.lstat(directory)
            # Root-only: a step must not be able to plant or remove a claim.
            if stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o077:
                return directory
    raise OSError(f"no root-only directory for uid claims among {', '.join(CLAIM_DIRS)}")


def _name(start: int, count: int) -> str:
    return f"uids-{start}-{count}.lock"


def _live_overlap(directory: str, start: int, count: int) -> str | None:
    """The name of a live claim overlapping [start, start+count). Stale claims (their holder
    died, so the kernel dropped its lock) are removed on the way, overlapping or not, so that
    killed instances leave no files behind for long."""
    found = None
    for name in os.listdir(directory):
        parts = name.removesuffix(".lock").split("-")
        if len(parts) != 3 or parts[0] != "uids" or not (parts[1] + parts[2]).isdigit():
            continue
        other, other_count = int(parts[1]), int(parts[2])
        if _is_live(os.path.join(directory, name)):
            overlaps = not (other + other_count <= start or start + count <= other)
            if overlaps and found is None:
                found = f"uids {other}..{other + other_count - 1}"
    return found


def _is_live(path: str) -> bool:
    """Is the claim at `path` held? When not, it is stale and removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return False
    finally:
        os.close(fd)


def _hold(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
