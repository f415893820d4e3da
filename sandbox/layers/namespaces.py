"""Layer: pid, net, mount, ipc and uts namespaces, created by clone(2) flags in the zygote.

Stops: seeing or signalling other processes (pid: the step is pid 1 of its own namespace, and
killing it kills everything it started), reaching any network when the step has none (net: only
a downed loopback), SysV IPC shared with other steps (ipc), and renaming the host (uts).
Needs: CAP_SYS_ADMIN or a user namespace, and a seccomp profile that allows CLONE_NEW* (Docker's
and Fargate's refuse them). Probe: clone a throwaway child with each flag on its own.
"""

from __future__ import annotations

from sandbox import syscalls

FLAGS = {
    "userns": syscalls.CLONE_NEWUSER,
    "pidns": syscalls.CLONE_NEWPID,
    "netns": syscalls.CLONE_NEWNET,
    "mountns": syscalls.CLONE_NEWNS,
    "ipcns": syscalls.CLONE_NEWIPC,
    "utsns": syscalls.CLONE_NEWUTS,
}
HOSTNAME = "runnerd-step"


def clone_flags(layers: frozenset[str]) -> int:
    flags = 0
    for name, flag in FLAGS.items():
        if name in layers:
            flags |= flag
    return flags


def set_hostname() -> None:
    syscalls.sethostname(HOSTNAME)
