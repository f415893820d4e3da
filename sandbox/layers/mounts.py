"""Layer: a private /tmp, /var/tmp and /dev/shm (size-capped tmpfs), and a /proc of its own.

Stops: one step leaving files for a later one in shared temp dirs, filling the host's disk
through them, and (with a pid namespace) reading other processes through the host's /proc.
Needs: a mount namespace the child may mount in (CAP_SYS_ADMIN there, via the user namespace
or root). Probe: mount a tmpfs (and, as `private_proc`, a procfs) in a throwaway child.
"""

from __future__ import annotations

import os

from sandbox import syscalls

TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# statvfs(3) ST_NOSUID, ST_NODEV, ST_NOEXEC, ST_NOATIME, ST_NODIRATIME: the same bits as MS_*.
LOCKABLE_FLAGS = 0x2 | 0x4 | 0x8 | 0x400 | 0x800
TMPDIR = "/tmp"


def make_private() -> None:
    # Nothing mounted here may propagate back to the host's mount table (mount_namespaces(7)).
    syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, None)


def mount_temp_dirs(size_mb: int, keep: tuple[str, ...] = ()) -> None:
    """A fresh tmpfs over each temp dir. Paths in `keep` (the runtime's own files, when they
    were installed under a temp dir) are bound back, read-only, at the same place."""
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
    for path in TEMP_DIRS:
        if not os.path.isdir(path):
            continue
        kept = [(p, os.open(p, os.O_PATH)) for p in keep if p.startswith(path.rstrip("/") + "/")]
        syscalls.mount("tmpfs", path, "tmpfs", flags, f"size={size_mb}m,mode=1777")
        for kept_path, fd in kept:
            os.makedirs(kept_path, exist_ok=True)
            syscalls.mount(
                f"/proc/self/fd/{fd}", kept_path, None, syscalls.MS_BIND | syscalls.MS_REC, None
            )
            # In a user namespace a remount must keep the source's locked flags (nosuid, ...).
            locked = os.statvfs(kept_path).f_flag & LOCKABLE_FLAGS
            read_only = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | locked
            syscalls.mount("none", kept_path, None, read_only, None)
            os.close(fd)


def mount_proc() -> None:
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    syscalls.mount("proc", "/proc", "proc", flags, None)
