"""Where the CPU went during a measurement: the machine's user/system/idle split, and the
time the workers and everything under them (zygote, step children) used, in all or by role."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Split:
    """Percent of all cores' time over the interval (user includes nice; system includes
    irq and softirq), and the workers' own CPU seconds over it."""

    user_pct: float
    system_pct: float
    idle_pct: float
    workers_user_s: float
    workers_system_s: float


@dataclass(frozen=True)
class Snapshot:
    machine: tuple[float, float, float, float]  # user, system, idle, total
    workers: tuple[float, float]  # user, system


def snapshot(pids: list[int]) -> Snapshot:
    t = psutil.cpu_times()
    user = t.user + t.nice
    system = t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = user + system + idle + getattr(t, "steal", 0.0)
    return Snapshot((user, system, idle, total), _tree_cpu(pids))


def _tree_cpu(pids: list[int]) -> tuple[float, float]:
    """User and system seconds of the processes and all their descendants, reaped ones
    included (counted into their parent's children_* once waited for)."""
    user = system = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                c = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            user += c.user + (c.children_user if process is root else 0.0)
            system += c.system + (c.children_system if process is root else 0.0)
            if process is not root:
                # Steps reaped by the zygote land in its children_* times.
                user += c.children_user
                system += c.children_system
    return user, system


# CPU seconds (user, system) of one worker's tree, by the role of each process in it.
ByRole = dict[str, tuple[float, float]]
ROLES = ("worker", "zygote", "node zygote", "steps")


def by_role(worker: int, zygote: int | None, node_zygote: int | None) -> ByRole:
    """The same total as `snapshot` gives for the one worker, split: the worker itself; the
    zygote itself; the node zygote with the intermediates it forks and reaps (sandbox/
    node_fork.py); and the steps, running or warm ones, plus every one the zygote reaped
    (each JavaScript step child is reparented to the zygote, so it is reaped there too)."""
    found = dict.fromkeys(ROLES, (0.0, 0.0))

    def add(role: str, user: float, system: float) -> None:
        found[role] = (found[role][0] + user, found[role][1] + system)

    try:
        root = psutil.Process(worker)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in tree:
        try:
            c = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        if process.pid == zygote:
            add("zygote", c.user, c.system)
            add("steps", c.children_user, c.children_system)
            continue
        role = {worker: "worker", node_zygote: "node zygote"}.get(process.pid, "steps")
        add(role, c.user + c.children_user, c.system + c.children_system)
    return found


def role_between(before: ByRole, after: ByRole) -> ByRole:
    return {
        role: (after[role][0] - before[role][0], after[role][1] - before[role][1]) for role in ROLES
    }


def between(before: Snapshot, after: Snapshot) -> Split:
    d = [a - b for a, b in zip(after.machine, before.machine, strict=True)]
    total = d[3] or 1.0
    return Split(
        user_pct=100 * d[0] / total,
        system_pct=100 * d[1] / total,
        idle_pct=100 * d[2] / total,
        workers_user_s=after.workers[0] - before.workers[0],
        workers_system_s=after.workers[1] - before.workers[1],
    )
