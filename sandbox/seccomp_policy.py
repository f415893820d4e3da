"""The seccomp policy of the `seccomp` layer (sandbox/layers/seccomp.py), compiled once in the
zygote: the system calls a step has no business making.

Stops: ptrace and cross-process memory access, new namespaces (a way around every other layer),
mounts, kernel modules, kexec, bpf, perf, keyrings, io_uring (which would bypass this filter),
clock changes, secret memory and pipes grown past 64 KiB (memfd_secret, F_SETPIPE_SZ: memory no
process holds, which the Fargate memory watch cannot count), and sockets beyond an allowlist:
* without network: no socket(2) at all; socketpair(2) only as AF_UNIX SOCK_STREAM (asyncio's
  self-pipe, libuv and node need it); connect, bind, listen, accept, accept4 refused. A
  connected stream socket is all such a step has, and the kernel refuses a destination address
  on one (sendto/sendmsg: EISCONN), so it reaches no Unix socket by path and no abstract name,
  and cannot publish one: all steps without network share one network namespace (see
  namespaces.StepNetwork), and an abstract name there would let two customers' steps talk;
* with network: socket(2) only for AF_INET, AF_INET6 and AF_NETLINK with NETLINK_ROUTE (what
  glibc's getaddrinfo and getifaddrs use); never AF_UNIX, so the host's Unix sockets (docker.sock,
  a Redis socket, containerd-shim's abstract names) stay out of reach; socketpair as above.
  connect and bind stay (TCP, UDP, and glibc binds its netlink socket), so a socketpair end can
  be bound to an abstract name of the host's namespace: nothing can connect to it, but no one
  else can take the name while the step runs (docs/SECURITY.md, known gaps).
The default is allow: customer code runs CPython, node and arbitrary programs, and an allowlist
of system calls for all of them would break on every runtime upgrade; the allowlists here are
of arguments of the few calls that reach other processes. libseccomp cannot put two comparisons
on one argument in a rule, nor add an allow rule under an allow default, so each allowlist is
written as the denials of everything else (`_deny_other_values`, `_deny_other_bits`); an int
argument is compared as 64 bits, so a value with stray high bits (ignored by the kernel) is
refused too, except where noted. Denied calls fail with EPERM (ENOSYS for clone3, so libc falls
back to clone(2), whose flags the filter can inspect); foreign architectures are killed
(libseccomp's default bad-arch action).
Built once in the zygote (`build`), exported to BPF bytes, and loaded in each child with one
prctl (sandbox/layers/seccomp.py): compiling a filter per step would cost more than the fork.
Runs only in the zygote, never on the child path.
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
    # Secret memory is in no process's RSS and its file's st_blocks stays 0, so the memory
    # watch could not see it (RLIMIT_MEMLOCK 0 keeps it empty today; this does not rely on it).
    "memfd_secret",
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
# The kernel reads socket(2)'s and socketpair(2)'s arguments as int, fcntl(2)'s command as
# unsigned int (socket(7), fcntl(2)); values from <sys/socket.h>, <linux/netlink.h>, <fcntl.h>.
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
NETLINK_ROUTE = 0
SOCK_STREAM = 1
SOCK_FLAGS = 0o4000 | 0o2000000  # SOCK_NONBLOCK | SOCK_CLOEXEC, or'ed into the type
SOL_SOCKET, SO_SNDBUF, SO_RCVBUF = 1, 7, 8
F_SETPIPE_SZ = 1031
INT_BITS = 32
NETWORK_FAMILIES = (AF_INET, AF_INET6, AF_NETLINK)
# What a socket does with an address, refused to steps without network, which have only
# connected stream socketpairs: connect would still look a name up, bind would publish one.
ADDRESS_CALLS = ("connect", "bind", "listen", "accept", "accept4")
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


def build(network: bool, ipc: bool, memory_cgroup: bool = True) -> bytes:
    """Compile the filter for steps with or without network, with or without SysV/POSIX IPC
    (only allowed inside the step's own IPC namespace), and with or without a memory cgroup to
    hold what the kernel keeps for them, into BPF bytes. Without one, memfd_create and raising
    a socket's buffers are refused: a memfd's pages are in no process's RSS (and another uid's
    fds are hidden from the daemon's memory watch), and 64 socketpairs with 16 MB buffers each
    held 1 GB under a 64 MB limit."""
    policy = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    deny = pyseccomp.ERRNO(errno.EPERM)
    unheld = () if memory_cgroup else ("memfd_create",)
    for name in DENIED + (() if ipc else IPC_CALLS) + unheld:
        policy.add_rule(deny, name)
    if not memory_cgroup:
        level = pyseccomp.Arg(1, pyseccomp.MASKED_EQ, (1 << INT_BITS) - 1, SOL_SOCKET)
        for option in (SO_SNDBUF, SO_RCVBUF):
            name_arg = pyseccomp.Arg(2, pyseccomp.MASKED_EQ, (1 << INT_BITS) - 1, option)
            policy.add_rule(deny, "setsockopt", level, name_arg)
    for flag in _flag_bits(syscalls.NAMESPACE_FLAGS):
        policy.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    policy.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    _allow_sockets(policy, network)
    # fcntl's command is an unsigned int: compare the low 32 bits only, or a command with high
    # bits set would pass the filter and still be F_SETPIPE_SZ to the kernel.
    low = (1 << INT_BITS) - 1
    policy.add_rule(deny, "fcntl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, low, F_SETPIPE_SZ))
    with os.fdopen(os.memfd_create("seccomp-bpf"), "w+b") as sink:
        policy.export_bpf(sink)
        sink.seek(0)
        return sink.read()


def _allow_sockets(policy: pyseccomp.SyscallFilter, network: bool) -> None:
    deny = pyseccomp.ERRNO(errno.EPERM)
    if network:
        _deny_other_values(policy, "socket", 0, NETWORK_FAMILIES)
        # Netlink for routes and addresses only: sock_diag, audit, uevents are not a step's.
        family = pyseccomp.Arg(0, pyseccomp.EQ, AF_NETLINK)
        policy.add_rule(deny, "socket", family, pyseccomp.Arg(2, pyseccomp.NE, NETLINK_ROUTE))
    else:
        policy.add_rule(deny, "socket")
        for name in ADDRESS_CALLS:
            policy.add_rule(deny, name)
    _deny_other_values(policy, "socketpair", 0, (AF_UNIX,))
    _deny_other_bits(policy, "socketpair", 1, SOCK_STREAM, SOCK_FLAGS)


def _deny_other_values(
    policy: pyseccomp.SyscallFilter, name: str, arg: int, allowed: tuple[int, ...]
) -> None:
    """Refuse `name` unless argument `arg` is exactly one of `allowed`: below the smallest,
    above the largest, and every value in between that is not allowed."""
    deny = pyseccomp.ERRNO(errno.EPERM)
    low, high = min(allowed), max(allowed)
    policy.add_rule(deny, name, pyseccomp.Arg(arg, pyseccomp.GT, high))
    if low > 0:
        policy.add_rule(deny, name, pyseccomp.Arg(arg, pyseccomp.LT, low))
    for value in range(low + 1, high):
        if value not in allowed:
            policy.add_rule(deny, name, pyseccomp.Arg(arg, pyseccomp.EQ, value))


def _deny_other_bits(
    policy: pyseccomp.SyscallFilter, name: str, arg: int, wanted: int, ignored: int
) -> None:
    """Refuse `name` unless the int argument `arg`, without the bits of `ignored`, equals
    `wanted`: one rule per bit (set where `wanted` has it clear, clear where it is set), as
    MASKED_EQ has no "not equal". The kernel ignores the high 32 bits, so they are not checked."""
    deny = pyseccomp.ERRNO(errno.EPERM)
    for bit in _flag_bits(((1 << INT_BITS) - 1) & ~ignored):
        expected_if_refused = 0 if wanted & bit else bit
        policy.add_rule(
            deny, name, pyseccomp.Arg(arg, pyseccomp.MASKED_EQ, bit, expected_if_refused)
        )


def _flag_bits(mask: int) -> list[int]:
    return [1 << bit for bit in range(mask.bit_length()) if mask & (1 << bit)]
