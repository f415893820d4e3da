"""The cleaner takes back what a slot's uid left in a world-writable directory without ever
following a link and without skipping a directory another step locked (sandbox/cleaner.py).
Run in-process as root on a real tree: what a step could have built there, with another step's
help (a second uid that owns directories in it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox import cleaner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="building the tree needs root")

STEP, OTHER = 920_001, 920_002


def _make(path: Path, uid: int, mode: int, is_dir: bool = False) -> Path:
    if is_dir:
        path.mkdir()
    else:
        path.write_text(f"made by {uid}\n")
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def _owned_by(root: Path, uid: int) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_uid == uid:
                found.append(path)
    return found


def test_take_back_follows_no_link_and_enters_locked_directories(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("root's\n")
    trash_root = tmp_path / "trash"
    trash_root.mkdir(mode=0o700)

    _make(shared / "step-file", STEP, 0o644)
    own = _make(shared / "step-dir", STEP, 0o777, is_dir=True)
    _make(own / "other-file", OTHER, 0o644)
    link = shared / "step-link"
    link.symlink_to(victim)
    os.lchown(link, STEP, STEP)
    # Another step's directory, written to by this one, then locked by its owner.
    locked = _make(shared / "other-locked", OTHER, 0o777, is_dir=True)
    _make(locked / "step-file", STEP, 0o644)
    locked.chmod(0o700)
    # Another step's world-writable directory without the sticky bit, holding ours.
    open_dir = _make(shared / "other-open", OTHER, 0o777, is_dir=True)
    _make(open_dir / "step-dir", STEP, 0o755, is_dir=True)
    (open_dir / "victim-link").symlink_to(victim)

    trash = cleaner.Trash(str(trash_root), [str(shared)])
    moved = cleaner._take_back(str(shared), {STEP}, trash)

    assert _owned_by(shared, STEP) == []
    assert (victim / "keep.txt").read_text() == "root's\n"  # no link was followed
    assert (locked).exists() and (open_dir / "victim-link").is_symlink()  # others' kept
    assert moved and all(os.path.exists(path) for path in moved)  # in the trash, for later
    assert not any(str(shared) in path and "runnerd-trash" not in path for path in moved)
    trash.remove()
    assert not any(os.path.exists(path) for path in moved)
    assert [p.name for p in shared.iterdir() if p.name.startswith(".runnerd-trash")] == []


def test_kill_uid_range_ends_every_process_of_the_range() -> None:
    import subprocess
    import sys
    import time

    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], user=STEP + 5, group=STEP + 5
    )
    try:
        time.sleep(0.2)
        cleaner.kill_uid_range(STEP, 10)
        assert sleeper.wait(timeout=5) == -9
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
