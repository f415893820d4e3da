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
TMPDIR = "/tmp"


def make_private() -> None:
    # Nothing mounted here may propagate back to the host's mount table (mount_namespaces(7)).
    syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, None)


def mount_temp_dirs(size_mb: int) -> None:
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
    for path in TEMP_DIRS:
        if os.path.isdir(path):
            syscalls.mount("tmpfs", path, "tmpfs", flags, f"size={size_mb}m,mode=1777")


def mount_proc() -> None:
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    syscalls.mount("proc", "/proc", "proc", flags, None)
