"""Layer: kernel resource limits (setrlimit(2)) on the child and whatever it starts.

Stops: CPU spinning (RLIMIT_CPU: SIGKILL at the hard limit), memory exhaustion where no cgroup is
writable (RLIMIT_AS), fork bombs (RLIMIT_NPROC, counted per real uid, which is why every child
slot has its own uid), fd exhaustion (RLIMIT_NOFILE), disk filling by one file (RLIMIT_FSIZE:
the write fails with EFBIG once SIGXFSZ is ignored), core dumps. Needs nothing from the host.
"""

from __future__ import annotations

import resource
import signal

from sandbox.protocol import Limits

MB = 1024 * 1024
# V8 reserves address space it never touches (code range, pointer cage), so node gets headroom
# on RLIMIT_AS; its heap is held by --max-old-space-size and, where writable, the memory cgroup.
NODE_ADDRESS_SPACE_HEADROOM_MB = 4096


def table(limits: Limits, runtime: str, pids_cgroup: bool = False) -> list[tuple[int, int]]:
    address_space_mb = limits.memory_mb
    if runtime == "node":
        address_space_mb += NODE_ADDRESS_SPACE_HEADROOM_MB
    return [
        # soft < hard: SIGXCPU first (a handler-less pid 1 ignores it), SIGKILL one second later.
        (resource.RLIMIT_CPU, limits.cpu_s),
        (resource.RLIMIT_AS, address_space_mb * MB),
        # With a pids cgroup, it is the one to refuse a fork (its events count the refusals);
        # RLIMIT_NPROC stays just above it as the second wall.
        (resource.RLIMIT_NPROC, limits.pids + (1 if pids_cgroup else 0)),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * MB),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MEMLOCK, 0),
        (resource.RLIMIT_MSGQUEUE, 0),
    ]


def apply(limits: Limits, runtime: str, pids_cgroup: bool = False) -> None:
    for which, value in table(limits, runtime, pids_cgroup):
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        resource.setrlimit(which, (value, hard))
    # Over-size writes should fail with EFBIG (a clear error in the step) rather than kill it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
