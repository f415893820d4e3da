"""Run a command under the confinement ECS Fargate gives a container, reproduced on this host.

    python tests/fargate_profile.py COMMAND [ARGS...]

What Fargate (like Docker's defaults) allows a root container, and how this reproduces it:
* capabilities: only Docker's default set (no CAP_SYS_ADMIN, CAP_SYS_PTRACE, ...):
  `setpriv --bounding-set` before the exec, so root's exec gets no more than that set;
* a seccomp profile refusing namespaces: unshare, setns, and clone with any CLONE_NEW* flag
  fail with EPERM, clone3 with ENOSYS (so libc falls back to clone, whose flags are checked),
  mount-related calls with EPERM;
* /sys/fs/cgroup mounted read-only: remounted read-only in a private mount namespace made
  before the filter is loaded.
setresuid to another uid still works there (CAP_SETUID is in the default set), which is what
the sandbox falls back on.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys

import pyseccomp

from sandbox import syscalls

DOCKER_DEFAULT_CAPS = (
    "chown",
    "dac_override",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "net_bind_service",
    "net_raw",
    "sys_chroot",
    "mknod",
    "audit_write",
    "setfcap",
)
REFUSED = (
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsmount",
    "fspick",
    "mount_setattr",
)


def remount_cgroups_read_only() -> None:
    _unshare(syscalls.CLONE_NEWNS)
    syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, None)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        if point == "/sys/fs/cgroup" or point.startswith("/sys/fs/cgroup/"):
            flags = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY
            syscalls.mount("none", point, None, flags, None)


def load_namespace_filter() -> None:
    policy = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in REFUSED:
        policy.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    mask = syscalls.NAMESPACE_FLAGS
    for bit in range(mask.bit_length()):
        flag = 1 << bit
        if mask & flag:
            arg = pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag)
            policy.add_rule(pyseccomp.ERRNO(errno.EPERM), "clone", arg)
    policy.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    policy.load()


def _unshare(flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: fargate_profile.py COMMAND [ARGS...]")
    if os.geteuid() != 0:
        sys.exit("fargate_profile.py: must run as root (a Fargate container's root)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        sys.exit("fargate_profile.py: setpriv (util-linux) is needed")
    remount_cgroups_read_only()
    load_namespace_filter()
    bounding = "-all," + ",".join("+" + cap for cap in DOCKER_DEFAULT_CAPS)
    os.execv(setpriv, [setpriv, f"--bounding-set={bounding}", "--", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
