"""Layer: an allowlisted filesystem view as the step's root (the way bubblewrap and nsjail do it).

Stops: a step reading or writing anything on the host's filesystem that was not bound in. The
host's root minus a few temp dirs is a denylist, and every world-writable place it forgets
(/run/lock, a 1777 directory under /var) keeps one customer's files for the next. In the view
(built once by the zygote: sandbox/rootfs.py) the step sees a read-only root holding
read-only binds of what the runtimes need, a size-capped tmpfs of its own at /tmp (/var/tmp and
/dev/shm point into it, so `tmp_mb` bounds all three together) and its own /proc. Nothing else
exists, so nothing else is writable.
Needs: root in the zygote (to build the view) and a mount namespace per child. Probe: the
zygote builds the view at start; a throwaway child enters it the way a step does.

A child pays only for what is its own: a recursive bind of the view, one tmpfs, one procfs,
pivot_root and the detach of the old root.
"""

from __future__ import annotations

import os

from sandbox import syscalls
from sandbox.layers.mounts import TEMP_DIRS

READ_ONLY = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV


def mount_step_dirs(root: str, tmp_mb: int, keep: tuple[str, ...]) -> None:
    """Child half, before `enter`: a copy of the view that is this namespace's own, the
    step's own /tmp in it, and the runtime's files that live under a host temp dir (`keep`,
    in the order the zygote staged them) bound back at their place. The copy: in a user
    namespace the view's mounts came from a more privileged namespace and are locked, and
    pivot_root(2) refuses a locked new root."""
    syscalls.mount(root, root, None, syscalls.MS_BIND | syscalls.MS_REC, None)
    tmp = root + "/tmp"
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
    syscalls.mount("tmpfs", tmp, "tmpfs", flags, f"size={tmp_mb}m,mode=1777")
    for index, path in enumerate(keep):
        # /var/tmp/x and /dev/shm/x of the host land under the view's /tmp, which is where
        # the view's /var/tmp and /dev/shm point.
        inside = path if path.startswith("/tmp/") else "/tmp/" + path.split("/", 3)[-1]
        bind(staged(root, index), root + inside, read_only=True)


def staged(root: str, index: int) -> str:
    """Where the zygote bound the index-th runtime path under a temp dir, inside the view:
    the child binds from there, since the path itself may lie behind a directory the step's
    uid cannot enter (a 0700 `mktemp -d`)."""
    return f"{root}/.runtime/{index}"


def mount_proc(root: str) -> None:
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    syscalls.mount("proc", root + "/proc", "proc", flags, None)


def bind_host_proc(root: str) -> None:
    """Without a pid namespace a fresh procfs would show the host's processes anyway."""
    syscalls.mount("/proc", root + "/proc", None, syscalls.MS_BIND | syscalls.MS_REC, None)


def enter(root: str) -> None:
    """Make the view the root and drop every trace of the host's: pivot_root(".", ".") stacks
    the old root on the new one, and the lazy unmount takes it, with every mount under it,
    out of this namespace (pivot_root(2), "NOTES"). Fails closed: if the old root cannot be
    detached the step would see it, so the error stops the child."""
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")


def under_temp_dir(path: str) -> bool:
    return any(path.startswith(d + "/") for d in TEMP_DIRS)


def bind(source: str, target: str, read_only: bool) -> None:
    """Bind `source` at `target` (made as an empty file or directory chain, mode 0755)."""
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        with open(target, "a"):
            pass
    syscalls.mount(source, target, None, syscalls.MS_BIND | syscalls.MS_REC, None)
    flags = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_NOSUID
    if read_only:
        flags |= syscalls.MS_RDONLY | syscalls.MS_NODEV
    # Keep the flags the source carries that a remount may not clear (noexec on a mount).
    locked = os.statvfs(target).f_flag & (syscalls.MS_NOEXEC | syscalls.MS_RDONLY)
    syscalls.mount("none", target, None, flags | locked, None)
