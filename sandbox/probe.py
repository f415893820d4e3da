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
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from sandbox import rootfs, seccomp_policy, syscalls
from sandbox.errors import LayerError
from sandbox.layers import (
    cgroups,
    mounts,
    namespaces,
    privileges,
    rlimits,
    seccomp,
    userns,
    view,
)
from sandbox.protocol import Capabilities, LayerStatus, Limits
from sandbox.runtimes import node


@dataclass
class Probed:
    capabilities: Capabilities
    seccomp_programs: dict[bool, bytes] = field(default_factory=dict)  # network -> program
    controllers: list[cgroups.Controller] = field(default_factory=list)


def probe(probe_uid: int, owner_pid: int, node_path: str | None = None) -> Probed:
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
        readable = _in_child(0, lambda: _check_readable_as(probe_uid, node_path))
        if not readable.ok:
            problems.append(readable.reason)
    status["rlimits"] = _in_child(0, lambda: rlimits.apply(Limits(), "python"))
    status["no_new_privs"] = _in_child(0, privileges.set_no_new_privs)
    probed = Probed(Capabilities(status, problems))
    for controller in ("memory", "pids"):
        status[f"cgroup_{controller}"] = _probe_cgroup(probed, controller, owner_pid)
    status["seccomp"] = _probe_seccomp(probed)  # its filter depends on cgroup_memory
    return probed


def _probe_seccomp(probed: Probed) -> LayerStatus:
    try:
        ipc = probed.capabilities.layers["ipcns"].ok
        held = probed.capabilities.layers["cgroup_memory"].ok
        probed.seccomp_programs = {
            net: seccomp_policy.build(net, ipc, held) for net in (False, True)
        }
    except OSError as exc:
        return LayerStatus(False, f"cannot build the filter: {exc}")
    program = probed.seccomp_programs[False]

    def load() -> None:
        privileges.set_no_new_privs()
        seccomp.load(program)

    return _in_child(0, load)


def _check_readable_as(uid: int, node_path: str | None = None) -> None:
    """Check, as the slot uid `uid` (in a throwaway child), that what steps need is there for
    them: steps import lazily (the stdlib, site-packages) and node is exec'd as that uid, so
    a Python, venv or node under a directory other users cannot enter (/root, a 0700 temp dir,
    pyenv, nvm) fails every step with only "the child closed its channel" to show for it.

    `node_path` None leaves node unchecked; "" means none was found. Every problem names the
    path and the fix; all of them, joined by "; ", are the OSError's message."""
    needed, problems = _step_runtime_paths(node_path)
    privileges.drop_to_uid(uid)
    for what, path, mode in needed:
        problem = _access_problem(uid, what, path, mode)
        if problem:
            problems.append(problem)
    if problems:
        raise OSError(errno.EACCES, "; ".join(problems))


NODE_SETTING = "RUNNERD_NODE_PATH (--node-path)"  # runnerd's setting that names the node binary
_RX = os.R_OK | os.X_OK


def _step_runtime_paths(node_path: str | None) -> tuple[list[tuple[str, str, int]], list[str]]:
    """(what, path, access mode) of everything steps need, and the problems found as root: a
    node that is not there at all (as the slot uid, "missing" and "hidden" look alike)."""
    stdlib = os.path.dirname(os.__file__)
    site_packages = os.path.dirname(os.path.dirname(msgspec.__file__))
    needed = [
        ("the Python standard library", stdlib, _RX),
        ("the Python standard library", os.path.join(stdlib, "lib-dynload"), _RX),
        ("the installed packages", site_packages, _RX),
        ("msgspec", os.path.dirname(msgspec.__file__), _RX),
        ("the sandbox package", os.path.dirname(os.path.abspath(__file__)), _RX),
        ("the node runner", node.RUNNER, os.R_OK),
        ("the node runner", os.path.join(os.path.dirname(node.RUNNER), "msgpack.cjs"), os.R_OK),
    ]
    # Everything else steps may import from: a venv's own site-packages, an editable checkout.
    needed += [("the import path", p, _RX) for p in sys.path if p and os.path.isdir(p)]
    needed = [entry for entry in needed if os.path.exists(entry[1])]
    problems = []
    if node_path == "":
        problems.append(
            "node was not found on PATH, so JavaScript steps cannot run: install node where all "
            f"users can execute it, or set {NODE_SETTING} to its binary"
        )
    elif node_path is not None and not os.path.isfile(node_path):
        problems.append(
            f"node was set to {node_path}, which is not a file: set {NODE_SETTING} to the node "
            "binary"
        )
    elif node_path is not None:
        needed.append(("node", node_path, os.X_OK))
        real = os.path.realpath(node_path)  # through its symlinks (nvm, shims), as execve goes
        if real != node_path:
            needed.append(("node", real, os.X_OK))
    return needed, problems


def _access_problem(uid: int, what: str, path: str, mode: int) -> str | None:
    """None when this process (the slot uid) has `mode` on `path`; else which directory on the
    way keeps it out (or the path's own mode), and the fix."""
    if os.access(path, mode):
        return None
    verb = "execute" if mode == os.X_OK else "read"
    cause = f"steps (uid {uid}, like every slot uid) cannot {verb} {what} at {path}"
    elsewhere = f"or install it where all users can {verb} it"
    if what == "node":
        elsewhere += f" and set {NODE_SETTING} to it"
    parts = os.path.abspath(path).split("/")[1:]
    for depth in range(1, len(parts)):
        directory = "/" + "/".join(parts[:depth])
        if not os.access(directory, os.X_OK):
            return (
                f"{cause}: {directory} ({_mode_of(directory)}) does not let other users in; "
                f"make it searchable (chmod o+x {directory}) {elsewhere}"
            )
    wanted = "o+r" if mode == os.R_OK else "o+rx"
    return f"{cause}: it has {_mode_of(path)}; chmod {wanted} {path} {elsewhere}"


def _mode_of(path: str) -> str:
    """Like "mode 0700, owner uid 0", as far as this process may stat the path."""
    try:
        status = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"mode {status.st_mode & 0o7777:04o}, owner uid {status.st_uid}"


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


def probe_view(
    probed: Probed, view_root: str, probe_uid: int, node_path: str, bundle_dir: str = ""
) -> None:
    """Build the filesystem view in this process (the zygote) and enter it in a throwaway
    child the way a step does; record `fs_view`. Where the view works, what steps can read is
    checked inside it, as the slot uid, in place of the check on the host's paths."""
    layers = probed.capabilities.layers
    if os.geteuid() != 0:
        status = LayerStatus(False, "the zygote is not root, so it cannot build the view")
    elif not layers["mountns"].ok:
        status = LayerStatus(False, "needs mountns")
    else:
        status = _build_view(view_root, node_path, bundle_dir)
    problems = list(probed.capabilities.problems)
    if status.ok:
        status, problems = _enter_view_in_child(layers, view_root, probe_uid, node_path)
    layers["fs_view"] = status
    probed.capabilities = msgspec.structs.replace(probed.capabilities, problems=problems)


def _build_view(view_root: str, node_path: str, bundle_dir: str) -> LayerStatus:
    try:
        rootfs.build(view_root, rootfs.runtime_paths(node_path), bundle_dir)
    except OSError as exc:
        return LayerStatus(False, f"cannot build the view: {exc.strerror or exc}")
    return LayerStatus(True)


def _enter_view_in_child(
    layers: dict[str, LayerStatus], view_root: str, probe_uid: int, node_path: str
) -> tuple[LayerStatus, list[str]]:
    has_userns, has_pidns = layers["userns"].ok, layers["pidns"].ok
    flags = syscalls.CLONE_NEWNS
    flags |= syscalls.CLONE_NEWUSER if has_userns else 0
    flags |= syscalls.CLONE_NEWPID if has_pidns else 0
    keep = tuple(p for p in rootfs.runtime_paths(node_path) if view.under_temp_dir(p))
    mapped_uid = probe_uid
    report_read, report_write = os.pipe()

    def attempt() -> None:
        if has_userns:
            userns.become_namespace_root()
        view.mount_step_dirs(view_root, 1, keep)
        if has_pidns and layers["private_proc"].ok:
            view.mount_proc(view_root)
        else:
            view.bind_host_proc(view_root)
        view.enter(view_root)
        if has_userns:
            privileges.drop_capabilities()
        else:
            privileges.drop_to_uid(probe_uid)
        os.write(report_write, "\n".join(_unreadable_for_steps(probe_uid, node_path)).encode())

    setup = (lambda pid: userns.write_id_maps(pid, mapped_uid)) if has_userns else None
    status = _in_child(flags, attempt, setup)
    os.close(report_write)
    with os.fdopen(report_read, "rb") as report:
        problems = [line for line in report.read().decode().splitlines() if line]
    return status, problems


def _unreadable_for_steps(uid: int, node_path: str) -> list[str]:
    """Inside the view, as the step: what of the runtime it cannot read or execute."""
    needed, problems = _step_runtime_paths(node_path)
    for what, path, mode in needed:
        problem = _access_problem(uid, what, path, mode)
        if problem:
            problems.append(problem + " (inside the steps' filesystem view)")
    return problems
