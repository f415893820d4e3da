"""JavaScript steps: the confined child becomes `node node_runner.cjs` (execve, same pid).

Everything the child set up (namespaces, uid, rlimits, no_new_privs, seccomp) survives the
exec, so node runs confined from its first instruction. The runner speaks the step channel on
fd 3 and says Ready itself once node has started, so a pooled node child is one whose start-up
cost is already paid. One node process runs one step: nothing of one step's globalThis can reach
another.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.layers import ChildPlan

RUNNER = str(Path(__file__).with_name("node_runner.cjs"))
MB = 1024 * 1024


# Without it, WebAssembly (which node's own fetch() uses) reserves more address space per
# instance than RLIMIT_AS leaves, and fails with "Out of memory". Node >= 20 has it; the zygote
# passes it on only when the node it was given accepts it.
OPTIONAL_FLAGS = ("--disable-wasm-trap-handler",)


def supported_flags(node_path: str) -> tuple[str, ...]:
    """The OPTIONAL_FLAGS this node accepts (asked once, when the zygote starts)."""
    if not node_path:
        return ()
    accepted = []
    for flag in OPTIONAL_FLAGS:
        try:
            done = subprocess.run(
                [node_path, flag, "-e", "0"], capture_output=True, timeout=30, env={}, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            accepted.append(flag)
    return tuple(accepted)


def exec_node(plan: ChildPlan, layers: list[str]) -> None:
    memory_mb, tmpdir, output_mb = plan.limits.memory_mb, plan.tmpdir, plan.limits.output_mb
    argv = [
        plan.node_path,
        f"--max-old-space-size={max(16, memory_mb * 3 // 4)}",
        *plan.node_flags,
        RUNNER,
    ]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": tmpdir,
        "TMPDIR": tmpdir,
        "RUNNERD_LAYERS": ",".join(layers),
        "RUNNERD_TMPDIR": tmpdir,
        "RUNNERD_OUTPUT_MAX": str(output_mb * MB),
        "RUNNERD_PIDS": str(plan.limits.pids),
        "RUNNERD_NETWORK": "1" if plan.limits.network else "",
    }
    os.chdir(tmpdir)
    os.execve(plan.node_path, argv, env)
