"""Layer: an unprivileged uid per child slot, no capabilities, no_new_privs.

Stops: reading the daemon's files and /proc/<pid>/environ (root-owned), signalling or ptracing
the daemon and other steps (each slot has its own uid, so RLIMIT_NPROC and kill(-1) reach only
the step's own processes), regaining privileges through setuid binaries or file capabilities
(no_new_privs, which seccomp needs as well). Needs: root (CAP_SETUID/CAP_SETGID) in the zygote
for `uid_drop`; nothing for no_new_privs. Probe: setresuid to a slot uid in a throwaway child.
"""

from __future__ import annotations

import os

from sandbox import syscalls


def drop_to_uid(uid: int) -> None:
    """Outside a user namespace: become the slot uid. Going from 0 to non-zero ids clears every
    capability (capabilities(7), "Effect of user ID changes on capabilities")."""
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def drop_capabilities() -> None:
    """Inside a user namespace the step is uid 0 with full capabilities there: drop them all,
    and empty the bounding set so that no exec (node, an exec step) can get them back."""
    for cap in range(syscalls.last_capability() + 1):
        syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    syscalls.prctl(syscalls.PR_SET_SECUREBITS, syscalls.SECUREBITS_LOCKED_DOWN)
    syscalls.clear_capabilities()


def set_no_new_privs() -> None:
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
