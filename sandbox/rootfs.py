"""The filesystem view the children enter (sandbox/layers/view.py), built once by the zygote.

A read-only tmpfs holding read-only binds of what the runtimes need: /usr and the merged-usr
links, the interpreter's prefixes and import path, node's installation, a minimal /etc (small
files copied, directories bound, a passwd and group of its own) and five device nodes, with
mount points for the step's /tmp and /proc. Binds keep the runtime's own paths, so an
interpreter or venv under /root or a 0700 directory works: the directories leading to it are
the view's own, world-traversable. Runs only in the zygote, never on the child path.
"""

from __future__ import annotations

import os
import shutil
import sys

from sandbox import syscalls
from sandbox.layers.view import READ_ONLY, bind, staged, under_temp_dir

# Top-level entries of the host's root taken into the view: bound read-only when a directory,
# copied as a link when a link (Debian's merged /usr: /bin -> usr/bin).
SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# /etc entries the runtimes read: the dynamic loader's cache, name resolution (for steps with
# network), TLS roots, the time zone. Never passwd/shadow of the host: those are written below.
# Small files are copied into the view (every bind is one more mount each child copies);
# directories are bound.
ETC_FILES = (
    "ld.so.cache",
    "ld.so.conf",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "resolv.conf",
    "services",
    "protocols",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "mime.types",
    "os-release",
    "debian_version",
)
ETC_DIRS = ("ld.so.conf.d", "ssl", "ca-certificates", "alternatives")
ETC_FILE_MAX = 1024 * 1024
ETC_WRITTEN = {
    "passwd": "root:x:0:0:step:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "hostname": "runnerd-step\n",
}
# Where the worker's dependency bundle cache (runnerd/bundle_cache.py) appears in the view:
# bound read-only, so a step reads its bundle and can change nothing in it. A fixed place, not
# the host's path: the cache may lie under a temp dir, where the step's own /tmp would hide it.
VIEW_BUNDLES = "/bundles"
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "shm": "/tmp",
}


def build(root: str, extra_paths: tuple[str, ...], bundle_dir: str = "") -> None:
    """Build the view at `root`, in a mount namespace of this (root, single-threaded) process
    that nothing propagates out of. `extra_paths`: the runtime's own directories outside the
    system trees (see runtime_paths); those under a temp dir are bound per child instead.
    `bundle_dir`: the bundle cache, bound read-only at VIEW_BUNDLES."""
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, None)
    os.makedirs(root, mode=0o755, exist_ok=True)
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
    syscalls.mount("tmpfs", root, "tmpfs", flags, "size=8m,mode=755")
    for name in ("proc", "tmp", "dev", "etc", "var"):
        os.mkdir(os.path.join(root, name), 0o755)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.symlink("/tmp", os.path.join(root, "var", "tmp"))
    for tree in SYSTEM_TREES:
        _take(tree, root + tree)
    _build_etc(root)
    for name in DEVICES:
        bind(f"/dev/{name}", os.path.join(root, "dev", name), read_only=False)
    for name, target in DEV_LINKS.items():
        os.symlink(target, os.path.join(root, "dev", name))
    for path in extra_paths:
        if not under_temp_dir(path):
            bind(path, root + path, read_only=True)
    for index, path in enumerate(p for p in extra_paths if under_temp_dir(p)):
        bind(path, staged(root, index), read_only=True)
    if bundle_dir:
        bind(bundle_dir, root + VIEW_BUNDLES, read_only=True)
    # The root itself goes read-only last: the step can write nowhere but its own /tmp.
    syscalls.mount("none", root, None, syscalls.MS_REMOUNT | READ_ONLY, None)


def _build_etc(root: str) -> None:
    for name in ETC_DIRS:
        _take(os.path.join("/etc", name), os.path.join(root, "etc", name))
    for name in ETC_FILES:
        source = os.path.join("/etc", name)
        if os.path.isfile(source) and os.path.getsize(source) <= ETC_FILE_MAX:
            shutil.copyfile(source, os.path.join(root, "etc", name))
            os.chmod(os.path.join(root, "etc", name), 0o644)
    for name, text in ETC_WRITTEN.items():
        with open(os.path.join(root, "etc", name), "w") as f:
            f.write(text)


def _take(source: str, target: str) -> None:
    """A relative link is copied as a link (it resolves inside the view too); anything else
    that exists is bound read-only, an absolute link by what it points to."""
    if os.path.islink(source) and not os.path.isabs(os.readlink(source)):
        os.symlink(os.readlink(source), target)
    elif os.path.exists(source):
        bind(os.path.realpath(source), target, read_only=True)


def runtime_paths(node_path: str) -> tuple[str, ...]:
    """The runtime's own directories outside the system trees: the interpreter's prefixes
    (a venv, pyenv), its import path (the sandbox package, site-packages, an editable
    checkout) and node's installation. Outermost only; never the root or a system tree."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    package = os.path.dirname(os.path.realpath(__file__))  # sandbox/
    checkout = os.path.dirname(package)
    for entry in (p for p in sys.path if p):
        if os.path.realpath(entry) == checkout and not checkout.endswith("-packages"):
            # A source checkout on the import path (the zygote's working directory, an
            # editable install): its packages, not its .git, caches and benchmarks.
            candidates.update(os.path.join(checkout, name) for name in ("sandbox", "runnerd"))
        else:
            candidates.add(entry)
    if node_path:
        # The binary itself, not its directory: a node placed in a 0700 directory is then
        # reachable through the view's own directories (node needs nothing beside it).
        candidates.add(os.path.realpath(node_path))
    found = set()
    for path in candidates:
        real = os.path.realpath(path)
        if not os.path.exists(real) or real == "/" or _in_system_tree(real):
            continue
        if os.path.isfile(real) and real.endswith(".zip"):  # a zip on sys.path
            real = os.path.dirname(real)
        found.add(real)
    return tuple(sorted(p for p in found if not any(p.startswith(q + "/") for q in found)))


def _in_system_tree(path: str) -> bool:
    trees = [os.path.realpath(t) for t in SYSTEM_TREES if os.path.isdir(t)]
    return any(path == t or path.startswith(t + "/") for t in trees)
