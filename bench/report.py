"""What every scenario reports besides its figures: the machine, and the output formats."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _proc_field(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return "unknown"


def _cgroup_version() -> str:
    """v2 when /sys/fs/cgroup is the unified hierarchy, else v1 (memory and pids attach there,
    which costs an RCU grace period per migration)."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2"
    return "v1" if os.path.isdir("/sys/fs/cgroup/memory") else "none"


def _checkout() -> str:
    """The commit the sandbox and daemon code came from, and whether sandbox/ or runnerd/ had
    uncommitted changes (several people may share one checkout). Read only: no index refresh."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root), "--no-optional-locks"]
    commit = _first_line([*git, "rev-parse", "--short", "HEAD"])
    if not commit or " " in commit:
        return "unknown"
    try:
        done = subprocess.run(
            [*git, "status", "--porcelain", "--", "sandbox", "runnerd"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return commit
    changed = len(done.stdout.splitlines())
    return f"{commit}, {changed} file(s) changed in sandbox/ and runnerd/" if changed else commit


def machine_info(layers: Sequence[str], loop: str, node: str | None) -> dict[str, str]:
    memory_kb = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": _proc_field("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "memory": f"{int(memory_kb) // 1024} MiB" if memory_kb.isdigit() else "unknown",
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "unknown"),
        "cgroup": _cgroup_version(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "node": _first_line([node, "--version"]) if node else "not found",
        "bwrap": _first_line(["bwrap", "--version"]),
        "event loop": loop,
        # Other work on a shared machine moves every figure; this says how busy it was.
        "load average 1/5/15 min": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "sandbox layers on": ", ".join(layers) or "none",
        "runnerd at": _checkout(),
    }


def machine_markdown(info: dict[str, str]) -> str:
    return "\n".join(f"- {name}: {value}" for name, value in info.items())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ms(value: float) -> str:
    """Milliseconds with two significant decimals below 10, one above: noise is larger."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def write_json(path: str, data: Any) -> None:
    Path(path).write_text(json.dumps(_plain(data), indent=2) + "\n")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def document(heading: str, command: str, info: dict[str, str], body: str) -> str:
    """A full markdown report: the heading, what ran where, the command, then the body."""
    return f"{heading}\n\n{machine_markdown(info)}\n\nCommand: `{command}`\n\n{body}"


def config(args: Any) -> dict[str, Any]:
    """The run's flags, without the output ones."""
    return {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
