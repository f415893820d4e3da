"""Layer: the child holds exactly four fds.

Stops: a step reading or writing anything the zygote had open (the control socket, another
step's pipes). Needs nothing from the host. Always on, so the probe only reports it.
Layout: 0 = /dev/null, 1 = stdout pipe, 2 = stderr pipe, 3 = the step channel.
"""

from __future__ import annotations

import os

STEP_CHANNEL_FD = 3


def arrange(channel: int, stdout: int, stderr: int) -> None:
    # dup2 targets first go above 3 so that no source fd is overwritten before it is copied.
    staged = [os.dup(fd) for fd in (stdout, stderr, channel)]
    devnull = os.open(os.devnull, os.O_RDONLY)
    for target, source in zip((1, 2, STEP_CHANNEL_FD), staged, strict=True):
        os.dup2(source, target)
    os.dup2(devnull, 0)
    # closerange uses close_range(2) where the kernel has it, so this is one syscall.
    os.closerange(STEP_CHANNEL_FD + 1, os.sysconf("SC_OPEN_MAX"))
    os.set_inheritable(STEP_CHANNEL_FD, True)
