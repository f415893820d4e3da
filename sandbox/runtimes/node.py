"""JavaScript steps: the confined child becomes `node node_runner.mjs` (execve, same pid).

Everything the child set up (namespaces, uid, rlimits, no_new_privs, seccomp) survives the
exec, so node runs confined from its first instruction. The runner speaks the step channel on
fd 3 and says Ready itself once node has started, so a pooled node child is one whose start-up
cost is already paid. One node process runs one step: nothing of one step's globalThis can reach
another.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNNER = str(Path(__file__).with_name("node_runner.mjs"))
MB = 1024 * 1024


def exec_node(
    node_path: str, layers: list[str], tmpdir: str, memory_mb: int, output_mb: int
) -> None:
    argv = [
        node_path,
        f"--max-old-space-size={max(16, memory_mb * 3 // 4)}",
        RUNNER,
    ]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": tmpdir,
        "TMPDIR": tmpdir,
        "RUNNERD_LAYERS": ",".join(layers),
        "RUNNERD_TMPDIR": tmpdir,
        "RUNNERD_OUTPUT_MAX": str(output_mb * MB),
    }
    os.chdir(tmpdir)
    os.execve(node_path, argv, env)
