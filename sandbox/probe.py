"""Find out, once at start-up, which confinement layers this host allows.

Each layer is tried in a throwaway child (or, for cgroups, by creating this zygote's cgroup
directory) exactly as a real child would use it: namespaces together with the user namespace
when that works, mounts inside those namespaces, seccomp after no_new_privs. The result is a
Capabilities Struct (layer -> ok, reason) plus the resources the zygote keeps using: the
compiled seccomp programs and the cgroup controllers.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from sandbox import syscalls
from sandbox.errors import LayerError
from sandbox.layers import cgroups, mounts, namespaces, privileges, rlimits, seccomp, userns
from sandbox.protocol import Capabilities, LayerStatus, Limits
from sandbox.runtimes import node


@dataclass
class Probed:
    capabilities: Capabilities
    seccomp_programs: dict[bool, bytes] = field(default_factory=dict)  # network -> program
    controllers: list[cgroups.Controller] = field(default_factory=list)


def probe(probe_uid: int, owner_pid: int) -> Probed:
    status: dict[str, LayerStatus] = {
        "close_fds": LayerStatus(True),
        "clean_env": LayerStatus(True),
    }
    is_root = os.geteuid() == 0
    mapped_uid = probe_uid if is_root else os.geteuid()
    status["userns"] = _in_child(
        syscalls.CLONE_NEWUSER,
        userns.become_namespace_root,
        lambda pid: userns.write_id_maps(pid, mapped_uid),
    )
    base = syscalls.CLONE_NEWUSER if status["userns"].ok else 0

    def with_user(flags: int, action: Callable[[], object]) -> LayerStatus:
        setup = (lambda pid: userns.write_id_maps(pid, mapped_uid)) if base else None

        def attempt() -> None:
            if base:
                userns.become_namespace_root()
            action()

        return _in_child(base | flags, attempt, setup)

    for name in ("pidns", "ipcns"):
        status[name] = with_user(namespaces.FLAGS[name], lambda: None)
    status["netns"] = with_user(syscalls.CLONE_NEWNET, lambda: None)
    status["utsns"] = with_user(syscalls.CLONE_NEWUTS, namespaces.set_hostname)
    status["mountns"] = with_user(syscalls.CLONE_NEWNS, _mount_temp_dirs)
    status["private_proc"] = (
        with_user(syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID, _mount_proc)
        if status["pidns"].ok and status["mountns"].ok
        else LayerStatus(False, "needs pidns and mountns")
    )
    status["uid_drop"] = (
        _in_child(0, lambda: privileges.drop_to_uid(probe_uid))
        if is_root
        else LayerStatus(False, "the zygote is not root, so it cannot give steps their own uid")
    )
    problems = []
    if status["uid_drop"].ok:
        readable = _in_child(0, lambda: _check_readable_as(probe_uid))
        if not readable.ok:
            problems.append(readable.reason)
    status["rlimits"] = _in_child(0, lambda: rlimits.apply(Limits(), "python"))
    status["no_new_privs"] = _in_child(0, privileges.set_no_new_privs)
    probed = Probed(Capabilities(status, problems))
    status["seccomp"] = _probe_seccomp(probed)
    for controller in ("memory", "pids"):
        status[f"cgroup_{controller}"] = _probe_cgroup(probed, controller, owner_pid)
    return probed


def _probe_seccomp(probed: Probed) -> LayerStatus:
    try:
        ipc = probed.capabilities.layers["ipcns"].ok
        probed.seccomp_programs = {net: seccomp.build(net, ipc) for net in (False, True)}
    except OSError as exc:
        return LayerStatus(False, f"cannot build the filter: {exc}")
    program = probed.seccomp_programs[False]

    def load() -> None:
        privileges.set_no_new_privs()
        seccomp.load(program)

    return _in_child(0, load)


def _check_readable_as(uid: int) -> None:
    """Steps import lazily: the interpreter's files must be readable by the slot uids."""
    privileges.drop_to_uid(uid)
    needed = [os.path.dirname(os.__file__), os.path.dirname(msgspec.__file__), node.RUNNER]
    unreadable = [path for path in needed if not os.access(path, os.R_OK)]
    if unreadable:
        raise OSError(
            errno.EACCES,
            f"steps run as unprivileged uids and cannot read {', '.join(unreadable)}: make these "
            "readable by all users (for example, use a Python installed outside /root)",
        )


def _mount_temp_dirs() -> None:
    mounts.make_private()
    mounts.mount_temp_dirs(1)


def _mount_proc() -> None:
    mounts.make_private()
    mounts.mount_proc()


def _probe_cgroup(probed: Probed, controller: str, owner_pid: int) -> LayerStatus:
    try:
        probed.controllers.append(cgroups.create(controller, owner_pid))
    except LayerError as exc:
        return LayerStatus(False, exc.reason)
    return LayerStatus(True)


def _in_child(
    flags: int,
    action: Callable[[], object],
    parent_setup: Callable[[int], None] | None = None,
) -> LayerStatus:
    """Run `action` in a throwaway child made with clone(flags); report how it went."""
    go_read, go_write = os.pipe()
    report_read, report_write = os.pipe()
    try:
        pid = syscalls.clone(flags)
    except OSError as exc:
        for fd in (go_read, go_write, report_read, report_write):
            os.close(fd)
        return LayerStatus(False, exc.strerror or str(exc))
    if pid == 0:
        os.close(go_write)
        os.close(report_read)
        _child_attempt(go_read, report_write, action)
    os.close(go_read)
    os.close(report_write)
    try:
        if parent_setup is not None:
            parent_setup(pid)
        os.write(go_write, b"1")
    except OSError as exc:
        os.close(go_write)
        os.close(report_read)
        os.waitpid(pid, 0)
        return LayerStatus(False, f"parent setup: {exc.strerror or exc}")
    os.close(go_write)
    with os.fdopen(report_read, "rb") as report:
        message = report.read().decode(errors="replace")
    _, wait_status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wait_status) == 0:
        return LayerStatus(True)
    return LayerStatus(False, message or f"probe child ended with status {wait_status}")


def _child_attempt(go_read: int, report_write: int, action: Callable[[], object]) -> None:
    code = 1
    try:
        if os.read(go_read, 1) == b"1":
            action()
            code = 0
    except OSError as exc:
        os.write(report_write, (exc.strerror or str(exc)).encode())
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then the child exits
        os.write(report_write, repr(exc).encode())
    finally:
        os._exit(code)
