"""Layer: a seccomp filter refusing the system calls a step has no business making.

Stops: ptrace and cross-process memory access, new namespaces, mounts, kernel modules, bpf,
io_uring, sockets beyond an allowlist, and memory no process holds; the policy and why each
rule is there: sandbox/seccomp_policy.py, compiled once in the zygote to BPF bytes.
Needs: prctl(PR_SET_SECCOMP) after no_new_privs; allowed in Docker and Fargate.
Probe: build both filters (network on and off) and load one in a throwaway child.
"""

from __future__ import annotations

from sandbox import syscalls


def load(program: bytes) -> None:
    """One prctl: the filter was compiled in the zygote, before the fork."""
    syscalls.load_seccomp_bpf(program)
