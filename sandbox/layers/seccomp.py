"""Layer: a seccomp filter refusing the system calls a step has no business making.

Stops: ptrace and cross-process memory access, new namespaces (a way around every other layer),
mounts, kernel modules, kexec, bpf, perf, keyrings, io_uring (which would bypass this filter),
clock changes, and, for steps without network, creating any socket (the fallback for hosts
where no network namespace can be made; socketpair(2) stays allowed for asyncio and libuv).
The default is allow: customer code runs CPython, node and arbitrary programs, and an allowlist
for all of them would break on every runtime upgrade. Denied calls fail with EPERM (ENOSYS for
clone3, so libc falls back to clone(2), whose flags the filter can inspect); foreign
architectures are killed (libseccomp's default bad-arch action).
Needs: prctl(PR_SET_SECCOMP) after no_new_privs; allowed in Docker and Fargate.
Probe: build both filters and load one in a throwaway child.

Built once in the zygote (`build`), exported to BPF bytes, and loaded in each child with one
prctl (`load`): compiling a filter per step would cost more than the fork.
"""

from __future__ import annotations

import errno
import os

import pyseccomp

from sandbox import syscalls

DENIED = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "unshare",
    "setns",
    "swapon",
    "swapoff",
    "reboot",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "acct",
    "quotactl",
    "syslog",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "fanotify_init",
    "sethostname",
    "setdomainname",
    "vhangup",
    "uselib",
    "personality",
)
NETWORK_CALLS = ("socket",)
# Without an IPC namespace, SysV IPC objects and POSIX message queues would be the host's,
# outliving the step and visible to later ones; steps then get none.
IPC_CALLS = (
    "shmget",
    "shmat",
    "shmctl",
    "shmdt",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
)


def build(network: bool, ipc: bool) -> bytes:
    """Compile the filter for steps with or without network, and with or without SysV/POSIX
    IPC (only allowed inside the step's own IPC namespace), into BPF bytes."""
    policy = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    deny = pyseccomp.ERRNO(errno.EPERM)
    for name in DENIED + (() if network else NETWORK_CALLS) + (() if ipc else IPC_CALLS):
        policy.add_rule(deny, name)
    for flag in _flag_bits(syscalls.NAMESPACE_FLAGS):
        policy.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    policy.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    with os.fdopen(os.memfd_create("seccomp-bpf"), "w+b") as sink:
        policy.export_bpf(sink)
        sink.seek(0)
        return sink.read()


def load(program: bytes) -> None:
    syscalls.load_seccomp_bpf(program)


def _flag_bits(mask: int) -> list[int]:
    return [1 << bit for bit in range(mask.bit_length()) if mask & (1 << bit)]
