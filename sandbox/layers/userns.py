"""Layer: a user namespace whose root is an unprivileged uid outside.

Stops: a step that breaks out of its other namespaces still holds only the slot's host uid, and
the capabilities it has inside (used briefly to mount its private /tmp and /proc) count only
for namespaces it owns. Needs: clone(CLONE_NEWUSER) allowed (refused by Docker's and Fargate's
default seccomp profile). Probe: clone a child with the flag, map it, and setresuid(0) in it.

The zygote (root outside) writes the child's maps; the child waits for that before going on
(the handshake of user_namespaces(7): only a process with CAP_SETUID in the parent namespace
may map a uid other than its own).
"""

from __future__ import annotations

import os

from sandbox import syscalls


def write_id_maps(pid: int, outside_id: int) -> None:
    """Parent half: map uid/gid 0 inside to `outside_id` outside. setgroups must be denied first."""
    mapping = f"0 {outside_id} 1\n".encode()
    syscalls.write_file(f"/proc/{pid}/uid_map", mapping)
    syscalls.write_file(f"/proc/{pid}/setgroups", b"deny")
    syscalls.write_file(f"/proc/{pid}/gid_map", mapping)


def become_namespace_root() -> None:
    """Child half: take the mapped ids, so the kernel sees the slot uid, not the zygote's root.

    Until this call the child still carries the zygote's credentials (host uid 0), only shown
    as the overflow uid inside.
    """
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
