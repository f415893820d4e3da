"""The bundle archive (deterministic packing, unpacking that trusts nothing in it) and the
declaration's validation, without installing anything."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from runnerd import bundle_archive
from runnerd.bundle_archive import ArchiveError
from runnerd.errors import ConfigError
from runnerd.integration import Integration
from tests.runnerd.bundles import tar_member as member
from tests.runnerd.bundles import tar_of as archive


def tree(root: Path) -> Path:
    (root / "node_modules" / "a").mkdir(parents=True)
    (root / "node_modules" / "a" / "index.js").write_text("module.exports = 1")
    (root / "python").mkdir()
    (root / "python" / "m.py").write_text("x = 1")
    return root


def test_the_same_files_pack_to_the_same_bytes(tmp_path: Path) -> None:
    first = bundle_archive.pack(tree(tmp_path / "one"))
    second_root = tree(tmp_path / "two")
    os.utime(second_root / "python" / "m.py", (1, 1))  # other times, same content
    os.chmod(second_root / "python" / "m.py", 0o600)
    assert bundle_archive.pack(second_root) == first


def test_a_packed_bundle_unpacks_read_only_for_others(tmp_path: Path) -> None:
    data = bundle_archive.pack(tree(tmp_path / "src"))
    into = tmp_path / "into"
    into.mkdir()
    assert bundle_archive.unpack(data, into, 1 << 20) == len("module.exports = 1") + 5
    mode = (into / "python" / "m.py").stat().st_mode
    assert stat.S_IMODE(mode) == 0o644


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        (member("/etc/evil"), "outside the bundle"),
        (member("python/../../evil"), "outside the bundle"),
        (member("python/link", tarfile.SYMTYPE, linkname="/etc/passwd"), "a link"),
        (member("python/inner", tarfile.SYMTYPE, linkname="m.py"), "a link"),
        (member("python/hard", tarfile.LNKTYPE, linkname="python/m.py"), "a link"),
        (member("python/null", tarfile.CHRTYPE, devmajor=1, devminor=3), "a device or fifo"),
        (member("python/fifo", tarfile.FIFOTYPE), "a device or fifo"),
    ],
)
def test_unsafe_entries_are_refused(entry: tarfile.TarInfo, said: str, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=said):
        bundle_archive.unpack(archive((entry, b"x")), tmp_path, 1 << 20)
    assert not Path("/etc/evil").exists()


def test_setuid_bits_and_write_bits_are_dropped(tmp_path: Path) -> None:
    data = archive((member("tool", mode=0o6777), b"#!/bin/sh\n"))
    bundle_archive.unpack(data, tmp_path, 1 << 20)
    assert stat.S_IMODE((tmp_path / "tool").stat().st_mode) == 0o755


def test_unpacking_stops_at_the_size_cap(tmp_path: Path) -> None:
    data = archive((member("big"), b"\0" * 4096), (member("bigger"), b"\0" * 8192))
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        bundle_archive.unpack(data, tmp_path, 10_000)


def test_garbage_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a readable bundle archive"):
        bundle_archive.unpack(b"\x1f\x8b garbage", tmp_path, 1 << 20)


STEP = {"name": "s", "source": "def run(input, ctx):\n    return input"}


@pytest.mark.parametrize(
    ("dependencies", "files", "said"),
    [
        (
            {"npm": {"left-pad": "^1.3.0"}},
            {},
            "`$.dependencies.npm.left-pad`: '^1.3.0' is not an exact",
        ),
        ({"npm": {"Bad Name": "1.0.0"}}, {}, "'Bad Name' is not an npm package name"),
        ({"pip": {"six": ">=1"}}, {}, "`$.dependencies.pip.six`: '>=1' is not an exact version"),
        ({"pip": "req.txt"}, {"req.txt": "six==1.17.0\nrequests\n"}, "req.txt line 2: 'requests'"),
        ({"pip": "req.txt"}, {"req.txt": "-e git+https://x\n"}, "req.txt line 1"),
        ({"npm": "package.json"}, {}, "a lock file is named package-lock.json"),
        ({"npm": "package-lock.json"}, {"package-lock.json": "{}"}, "cannot read"),
        ({"pypi": {}}, {}, "unknown field `pypi`"),
    ],
)
def test_declarations_are_checked_naming_the_field(
    dependencies: object, files: dict[str, str], said: str, tmp_path: Path
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as raised:
        Integration.from_dict(
            {"name": "i", "dependencies": dependencies, "steps": [STEP]}, tmp_path
        )
    assert said in str(raised.value)


def test_the_integration_carries_only_the_bundle_id(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text(
        "# pinned\nsix==1.17.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    )
    spec = {
        "name": "i",
        "dependencies": {"pip": "requirements.txt"},
        "steps": [
            STEP,
            {
                "name": "own",
                "runtime": "node",
                "source": "module.exports.run = (i) => i",
                "dependencies": {"npm": {"ms": "2.1.3"}},
            },
            {"name": "exec", "exec": ["true"]},
        ],
    }
    integration = Integration.from_dict(spec, tmp_path)
    shared, own, none = (step.bundle for step in integration.steps)
    assert len(shared) == 64 and len(own) == 64 and shared != own and none == ""
    encoded = json.dumps([str(step) for step in integration.steps])
    assert "six" not in encoded and "ms" not in encoded.replace("limits", "")
    again = Integration.from_dict(spec, tmp_path)
    assert [s.bundle for s in again.steps] == [shared, own, ""]  # the same declaration, same id
