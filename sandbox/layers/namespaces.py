"""Layer: pid, net, mount, ipc and uts namespaces, created by clone(2) flags in the zygote.

Stops: seeing or signalling other processes (pid: the step is pid 1 of its own namespace, and
killing it kills everything it started), reaching any network when the step has none (net: only
a downed loopback), SysV IPC shared with other steps (ipc), and renaming the host (uts).
Needs: CAP_SYS_ADMIN or a user namespace, and a seccomp profile that allows CLONE_NEW* (Docker's
and Fargate's refuse them). Probe: clone a throwaway child with each flag on its own.

The network namespace is the one not made per child: creating and tearing one down costs
more kernel time than all the others together, so the zygote moves itself once into an empty
network namespace (`StepNetwork`) and every child without network inherits it. Sharing it is
safe because those steps can neither create a socket nor give one a name or a destination
(the seccomp layer refuses socket, bind, connect, and allows only stream socketpairs), so no
abstract name of the shared namespace can join two of them; the namespace is the second wall.
A step with network is cloned from the host's namespace, which the zygote enters just for that
clone.
"""

from __future__ import annotations

import os

from sandbox import syscalls

FLAGS = {
    "userns": syscalls.CLONE_NEWUSER,
    "pidns": syscalls.CLONE_NEWPID,
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


class StepNetwork:
    """The zygote's two network namespaces: the host's, and an empty one it lives in."""

    def __init__(self) -> None:
        self.host = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        syscalls.unshare(syscalls.CLONE_NEWNET)
        self.empty = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def clone_in_host_network(self, flags: int) -> int:
        """clone(2) from the host's network namespace; only the parent goes back to the empty
        one (the child stays, and could not switch anyway once in its own user namespace)."""
        syscalls.setns(self.host, syscalls.CLONE_NEWNET)
        try:
            pid = syscalls.clone(flags)
        except OSError:
            syscalls.setns(self.empty, syscalls.CLONE_NEWNET)
            raise
        if pid != 0:
            syscalls.setns(self.empty, syscalls.CLONE_NEWNET)
        return pid
