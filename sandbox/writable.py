"""Where a step can leave files when it has no filesystem view (Fargate), and how to take them
back: the world-writable directories of the host, found once at start, and the removal of
everything a slot's uid owns in them.

Without a mount namespace a step writes wherever its slot uid may: its own temp dir, and every
directory writable by all users (a slot uid owns nothing else and is in no group). Those are
found by one walk of the host's filesystems at start (~0.25 s for ~160k entries here: `scandir`
gives the type of an entry without a stat, and only directories are looked at). The walk skips
read-only mounts and pseudo filesystems, does not descend into what a slot uid cannot traverse
(it could not write below) or into a writable directory (clean-up goes through it whole).
"""

from __future__ import annotations

import os
import stat

# Filesystems a step cannot leave files in (or that are the kernel's, not storage).
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "devpts",
        "mqueue",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "hugetlbfs",
        "autofs",
        "binfmt_misc",
        "nsfs",
    }
)
WALK_ENTRIES_MAX = 2_000_000  # a bound on the walk, far above a container's root filesystem
CLEAN_ENTRIES_MAX = 100_000  # per directory and release: what one clean-up may visit


def _unsearchable_mounts() -> set[str]:
    """Mount points the walk skips: read-only mounts and pseudo filesystems."""
    skipped = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point, options = fields[4], fields[5].split(",")
            fstype = fields[fields.index("-") + 1]
            if "ro" in options or fstype in PSEUDO_FILESYSTEMS:
                skipped.add(point.encode().decode("unicode_escape"))
    skipped.discard("/")  # a read-only root still has writable mounts below it
    return skipped


def find_writable_dirs(exclude: tuple[str, ...] = ()) -> list[str]:
    """Directories every user may write to, outside `exclude` (the zygote's own temp root)."""
    skipped = _unsearchable_mounts()
    root_read_only = os.statvfs("/").f_flag & os.ST_RDONLY
    found: list[str] = []
    stack = ["/"]
    visited = 0
    while stack and visited < WALK_ENTRIES_MAX:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                visited += 1
                path = entry.path
                if path in skipped or path in exclude:
                    continue
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    mode = entry.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue
                if mode & stat.S_IWOTH and not (root_read_only and _on_root_mount(path)):
                    found.append(path)
                elif mode & stat.S_IXOTH:
                    stack.append(path)
    return sorted(found)


def _on_root_mount(path: str) -> bool:
    return os.stat(path).st_dev == os.stat("/").st_dev
