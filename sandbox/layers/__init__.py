"""The ordered recipe of confinement layers a child applies to itself, and its inputs.

The zygote decides which layers a child gets (what the probe found working, minus what the step
does not want, such as the network namespace for a step with network) and hands the child a
`ChildPlan`. The child runs `apply` once: every layer in order, seccomp last; a layer that is
off is skipped, a layer that is on and fails raises LayerError and the child stops (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sandbox.errors import LayerError
from sandbox.layers import fds, mounts, namespaces, privileges, rlimits, seccomp, userns, view
from sandbox.protocol import Limits, Runtime

# Every layer the probe reports, in the order a child applies them. Namespaces and cgroups are
# set up by the zygote around clone(2); the child's part of them is in RECIPE below.
ALL_LAYERS = (
    "close_fds",
    "clean_env",
    "userns",
    "pidns",
    "netns",
    "mountns",
    "fs_view",
    "ipcns",
    "utsns",
    "uid_drop",
    "private_proc",
    "cgroup_memory",
    "cgroup_pids",
    "rlimits",
    "no_new_privs",
    "seccomp",
)


@dataclass(frozen=True)
class ChildPlan:
    """Everything one child needs to confine itself. Lives only in memory, across fork."""

    runtime: Runtime
    limits: Limits
    uid: int  # the slot's unprivileged host uid (and gid)
    layers: frozenset[str]
    seccomp_program: bytes
    tmpdir: str  # the private temp dir, as the step sees it
    channel_fd: int
    stdout_fd: int
    stderr_fd: int
    node_path: str
    node_flags: tuple[str, ...] = ()
    keep_paths: tuple[str, ...] = ()  # runtime files under a temp dir, bound back read-only
    view_root: str = ""  # where the zygote built the filesystem view, with `fs_view`


def _uid_drop(plan: ChildPlan) -> None:
    # With a user namespace the slot uid is the namespace root's outside id already.
    if "userns" not in plan.layers:
        privileges.drop_to_uid(plan.uid)


def _mount_temp_dirs(plan: ChildPlan) -> None:
    if "fs_view" in plan.layers:
        # The zygote's namespace, which this one copies, is private already.
        view.mount_step_dirs(plan.view_root, plan.limits.tmp_mb, plan.keep_paths)
        return
    mounts.make_private()
    mounts.mount_temp_dirs(plan.limits.tmp_mb, plan.keep_paths)


def _mount_proc(plan: ChildPlan) -> None:
    if "fs_view" in plan.layers:
        view.mount_proc(plan.view_root)
    else:
        mounts.mount_proc()


def _enter_view(plan: ChildPlan) -> None:
    if "private_proc" not in plan.layers:
        view.bind_host_proc(plan.view_root)
    view.enter(plan.view_root)


RECIPE: list[tuple[str, Callable[[ChildPlan], None]]] = [
    ("close_fds", lambda plan: fds.arrange(plan.channel_fd, plan.stdout_fd, plan.stderr_fd)),
    ("userns", lambda plan: userns.become_namespace_root()),
    # Mounts and the hostname need privileges (in the user namespace, or root without one),
    # so they come before the uid drop.
    ("mountns", _mount_temp_dirs),
    ("private_proc", _mount_proc),
    ("fs_view", _enter_view),
    ("utsns", lambda plan: namespaces.set_hostname()),
    ("uid_drop", _uid_drop),
    ("rlimits", lambda p: rlimits.apply(p.limits, p.runtime, "cgroup_pids" in p.layers)),
    # Only a user namespace leaves capabilities to drop (a plain uid drop cleared them all).
    ("userns", lambda plan: privileges.drop_capabilities()),
    ("no_new_privs", lambda plan: privileges.set_no_new_privs()),
    ("seccomp", lambda plan: seccomp.load(plan.seccomp_program)),
]


def apply(plan: ChildPlan) -> None:
    for name, step in RECIPE:
        if name not in plan.layers:
            continue
        try:
            step(plan)
        except OSError as exc:
            raise LayerError(name, exc.strerror or str(exc)) from exc
