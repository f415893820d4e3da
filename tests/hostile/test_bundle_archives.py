"""A hostile customer stores a bundle of its own making in Redis, under the bundle keys of an
integration it submits (a forged archive, a forged manifest, a bundle id with path characters),
so that the worker that fetches it unpacks something it should not, outside its cache, or
spends its memory, time or disk on it. The worker unpacks in the daemon, unconfined: each
attempt must end as that step's `bundle` error, with the worker alive, serving the next step,
at its usual memory, and nothing written outside the cache or left in its staging directory.
Under the full profile and the Fargate one (the daemon's capabilities reduced)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from runnerd.bundle_store import CHUNK_BYTES, BundleManifest, chunks_of
from runnerd.client import Client
from runnerd.integration import Integration
from runnerd.keys import Keys
from tests.conftest import PROFILES
from tests.hostile.conftest import Witnesses
from tests.runnerd.bundles import start_worker, submit_wait, tar_member, write
from tests.runnerd.bundles import tar_of as _tar_of
from tests.runnerd.conftest import SHARED_REDIS_URL, Daemon, delete_keys

STEP = "def run(input, ctx):\n    return 'ran'\n"
# What the worker may hold at its peak after unpacking a bomb: it starts near 100 MB; a bomb
# that it read into memory would take it past 1 GB.
DAEMON_PEAK_MB_MAX = 400
BOMB_BYTES = 1 << 30  # what a bomb's header claims: 1 GiB, about 1 MB once compressed


# --- archives ----------------------------------------------------------------------------------


def _tar_raw(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    return _tar_of(*members, compress=False)


def _deflated(*parts: bytes | tuple[bytes, int]) -> bytes:
    """gzip of the parts, a (byte, count) part being that byte repeated, compressed as it is
    made: a gigabyte of it never exists here."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = io.BytesIO()
    for part in parts:
        if isinstance(part, bytes):
            out.write(packer.compress(part))
            continue
        byte, count = part
        block = byte * (1 << 20)
        for _ in range(count >> 20):
            out.write(packer.compress(block))
        out.write(packer.compress(byte * (count & ((1 << 20) - 1))))
    out.write(packer.flush())
    return out.getvalue()


def _header_bomb(kind: bytes) -> bytes:
    """One header whose own content (a GNU long name, a pax record) claims BOMB_BYTES: tar
    readers read such a header whole, before the member it describes is seen."""
    info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "pax")
    info.type, info.size = kind, BOMB_BYTES
    return _deflated(info.tobuf(format=tarfile.GNU_FORMAT), (b"a", BOMB_BYTES))


def _pax_chain(count: int = 5000) -> bytes:
    """Global pax headers one after another: each read recurses into reading the next."""
    header = tarfile.TarInfo("g")._create_pax_generic_header(
        {"comment": "x"}, tarfile.XGLTYPE, "utf-8"
    )
    return header * count


def _pax_sparse_map() -> bytes:
    """A pax GNU.sparse 1.0 member whose map claims 10 million entries: the reader collects
    them, one read of a block after another, before the member is seen."""
    fields = 10_000_000
    pax = tarfile.TarInfo("s")._create_pax_generic_header(
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "python/s"},
        tarfile.XHDTYPE,
        "utf-8",
    )
    info = tar_member("python/s", size=BOMB_BYTES)
    return _deflated(
        pax, info.tobuf(format=tarfile.USTAR_FORMAT), b"%d\n" % fields, (b"0\n", 2 * fields)
    )


def _gnu_sparse_map() -> bytes:
    """An old GNU sparse ('S') member with a chain of 200,000 extension blocks, 21 map
    entries each: read and kept before the member is seen."""
    info = tar_member("python/s", tarfile.GNUTYPE_SPARSE, size=0)
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[482] = 1  # isextended
    header[148:156] = b" " * 8  # the checksum, counted as spaces
    header[148:155] = b"%06o\0" % sum(header)
    entry = b"%011o\0%011o\0" % (1, 1)
    block = entry * 21 + b"\1" + b"\0" * 7
    return _deflated(bytes(header), block * 200_000)


def _negative_size() -> bytes:
    """A pax record giving a member a negative size: the reader would step back and read the
    same bytes again as further files, past the size and stream caps."""
    pax = tarfile.TarInfo("x")._create_pax_generic_header(
        {"size": "-2048"}, tarfile.XHDTYPE, "utf-8"
    )
    return gzip.compress(pax + _tar_raw((tar_member("python/a"), b"a" * 4096)))


def _pax_globals() -> bytes:
    """One global pax header of 6,000 records, then 1,500 directories: the reader copies the
    records into every member it keeps (300 MB at its peak from 18 KB of gzip)."""
    records = {f"k{n}": "v" for n in range(6000)}
    header = tarfile.TarInfo("g")._create_pax_generic_header(records, tarfile.XGLTYPE, "utf-8")
    dirs = b"".join(
        tar_member(f"python/d{n}", tarfile.DIRTYPE).tobuf(format=tarfile.USTAR_FORMAT)
        for n in range(1500)
    )
    return gzip.compress(header + dirs + b"\0" * tarfile.RECORDSIZE)


def _corrupt_deflate() -> bytes:
    data = bytearray(_tar_of((tar_member("python/m.py"), b"x = 1\n" * 5000)))
    for index in range(20, len(data) - 20, 7):
        data[index] ^= 0x5A
    return bytes(data)


def _files_then_broken() -> bytes:
    """40 MB of files the unpacking writes, then a header chain that breaks the tar reader."""
    files = [(tar_member(f"python/blob{n}.bin"), b"\0" * (1 << 20)) for n in range(40)]
    tar = _tar_raw(*files)
    return gzip.compress(tar[: -tarfile.RECORDSIZE] + _pax_chain(), compresslevel=1)


@dataclass
class Forged:
    archive: Callable[[Path], bytes]  # given a path outside the cache that must stay absent
    said: str  # in the step's error message
    bomb: bool = False  # the worker's memory is checked too


def _outside(outside: Path, name: str) -> str:
    return "python/" + "../" * 40 + str(outside / name).lstrip("/")


ARCHIVES = {
    "dotdot": Forged(lambda o: _tar_of((tar_member(_outside(o, "x")), b"x")), "outside"),
    "absolute": Forged(lambda o: _tar_of((tar_member(str(o / "x")), b"x")), "outside"),
    "symlink_then_file": Forged(
        lambda o: _tar_of(
            (tar_member("python/out", tarfile.SYMTYPE, linkname=str(o)), b""),
            (tar_member("python/out/x"), b"x"),
        ),
        "a link",
    ),
    "hardlink": Forged(
        lambda o: _tar_of((tar_member("python/h", tarfile.LNKTYPE, linkname=str(o / "x")), b"")),
        "a link",
    ),
    "device": Forged(
        lambda o: _tar_of((tar_member("python/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), b"")),
        "a device",
    ),
    "huge_file": Forged(
        lambda o: _deflated(
            tar_member("python/zeros", size=BOMB_BYTES).tobuf(format=tarfile.GNU_FORMAT),
            (b"\0", BOMB_BYTES),
        ),
        "unpacks to more than",
        bomb=True,
    ),
    "long_name_bomb": Forged(lambda o: _header_bomb(tarfile.GNUTYPE_LONGNAME), "", bomb=True),
    "pax_bomb": Forged(lambda o: _header_bomb(tarfile.XHDTYPE), "", bomb=True),
    "pax_sparse_map": Forged(lambda o: _pax_sparse_map(), "a sparse file", bomb=True),
    "gnu_sparse_map": Forged(lambda o: _gnu_sparse_map(), "a sparse file", bomb=True),
    "pax_chain": Forged(lambda o: gzip.compress(_pax_chain()), ""),
    "pax_globals": Forged(lambda o: _pax_globals(), "a global pax header", bomb=True),
    "negative_size": Forged(lambda o: _negative_size(), "negative size"),
    "corrupt_deflate": Forged(lambda o: _corrupt_deflate(), "not a readable bundle archive"),
    "files_then_broken": Forged(lambda o: _files_then_broken(), ""),
}


# --- storing a forged bundle ----------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    profile: str
    prefix: str
    cache: Path
    worker: Daemon


@pytest.fixture(scope="module", params=PROFILES)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One worker per profile for the module: every forged bundle has an id of its own, and a
    worker that any of them harmed fails that test (it must be alive and serve the next step)."""
    if request.param == "fargate" and os.geteuid() != 0:
        pytest.skip("the Fargate profile launcher needs root")
    prefix = f"tf{uuid.uuid4().hex[:12]}"
    # Under /var/tmp, not the test's 0700 tmp_path: without a view, the step uids must be
    # able to pass through the cache's parents to read it at all.
    cache = Path("/var/tmp") / f"runnerd-forged-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    daemon = start_worker(tmp_path_factory.mktemp("worker"), prefix, cache, profile=request.param)
    try:
        yield Served(str(request.param), prefix, cache, daemon)
    finally:
        daemon.stop()
        shutil.rmtree(cache, ignore_errors=True)
        delete_keys(client, f"{{{prefix}*")
        delete_keys(client, f"{prefix}*")
        client.close()


@pytest.fixture
def prefix(served: Served) -> str:
    return served.prefix


@pytest.fixture
def cache(served: Served) -> Path:
    return served.cache


@pytest.fixture
def worker(served: Served) -> Daemon:
    return served.worker


def _integration(directory: Path, name: str, source: str = STEP) -> tuple[Path, str]:
    """An integration whose step depends on a package of its own name: its bundle id, which
    nobody builds (the test stores what it wants under it)."""
    spec = {
        "name": name,
        "dependencies": {"pip": {f"forged-{name}": "1.0.0"}},
        "steps": [{"name": "step", "code": "step.py"}],
    }
    path = write(directory / name, spec, {"step.py": source})
    return path, Integration.load(path).steps[0].bundle


def _store(prefix: str, bundle_id: str, archive: bytes, **manifest: Any) -> None:
    """The chunks and manifest a build would store, of bytes a build would never make."""
    keys = Keys(prefix, 1)
    sha = hashlib.sha256(archive).hexdigest()
    fields: dict[str, Any] = {
        "sha256": sha,
        "size": len(archive),
        "chunks": chunks_of(len(archive)),
        "unpacked_bytes": 1000,
        "packages": ["forged==1.0.0"],
    }
    fields.update(manifest)
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        for index in range(chunks_of(len(archive))):
            part = archive[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
            client.set(keys.bundle_chunk(bundle_id, sha, index), part)
        client.set(
            keys.bundle_manifest(bundle_id), msgspec.msgpack.encode(BundleManifest(**fields))
        )
    finally:
        client.close()


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _assert_worker_unharmed(
    worker: Daemon,
    cache: Path,
    tmp_path: Path,
    prefix: str,
    witnesses: Witnesses,
    bundle_id: str | None = None,
) -> None:
    """Alive, serving the next step, nothing left in staging, the forged bundle not unpacked."""
    assert worker.is_alive(), worker.log()[-3000:]
    plain = write(
        tmp_path / "plain",
        {"name": "plain", "steps": [{"name": "step", "code": "step.py"}]},
        {"step.py": STEP},
    )
    after = submit_wait(plain, prefix, None)
    assert after["status"] == "succeeded" and after["output"] == "ran", after
    assert list((cache / ".staging").iterdir()) == []
    if bundle_id is not None:
        assert not (cache / bundle_id).exists()
    assert "failed in the worker" not in worker.log(), worker.log()[-3000:]
    witnesses.assert_unharmed()


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_a_forged_archive_is_refused_as_the_steps_bundle_error(
    name: str,
    prefix: str,
    cache: Path,
    worker: Daemon,
    tmp_path: Path,
    witnesses: Witnesses,
) -> None:
    forged = ARCHIVES[name]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("root's\n")
    (outside / "x").chmod(0o600)
    if name in ("dotdot", "absolute", "symlink_then_file"):
        (outside / "x").unlink()  # what the archive would create
    path, bundle_id = _integration(tmp_path, name.replace("_", "-"))
    _store(prefix, bundle_id, forged.archive(outside))
    result = submit_wait(path, prefix, None)
    assert result["status"] == "failed", result
    error = result["error"]
    assert error["type"] == "bundle", error
    assert f"bundle {bundle_id[:12]} (forged==1.0.0) refused:" in error["message"], error
    assert forged.said in error["message"], error
    if name in ("dotdot", "absolute", "symlink_then_file"):
        assert list(outside.iterdir()) == []
    else:
        assert stat.S_IMODE((outside / "x").stat().st_mode) == 0o600
        assert (outside / "x").read_text() == "root's\n"
    if forged.bomb:
        assert _peak_mb(worker.pid) < DAEMON_PEAK_MB_MAX
    _assert_worker_unharmed(worker, cache, tmp_path, prefix, witnesses, bundle_id)


def _manifest_chunks_off(prefix: str, bundle_id: str) -> None:
    # A few bytes of archive in two chunks. Seen before the check: with 10**12 the worker
    # built a list of key names until it was stopped, and served nothing meanwhile; not
    # tested with that number, since the test of a worker without the check would do it again.
    _store(prefix, bundle_id, _tar_of(), chunks=2)


def _manifest_garbage(prefix: str, bundle_id: str) -> None:
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    client.set(Keys(prefix, 1).bundle_manifest(bundle_id), b"\xc1 not msgpack")
    client.close()


def _manifest_wrong_types(prefix: str, bundle_id: str) -> None:
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    forged = msgspec.msgpack.encode({"sha256": 7, "size": "big", "chunks": [], "unpacked": 1})
    client.set(Keys(prefix, 1).bundle_manifest(bundle_id), forged)
    client.close()


def _manifest_of_other_chunks(prefix: str, bundle_id: str) -> None:
    # Another bundle's archive, stored properly under its own id; this manifest names it.
    archive = _tar_of((tar_member("python/m.py"), b"x = 1\n"))
    _store(prefix, "f" * 64, archive)
    sha = hashlib.sha256(archive).hexdigest()
    _store(prefix, bundle_id, b"", sha256=sha, size=len(archive), chunks=1)


def _manifest_packages_huge(prefix: str, bundle_id: str) -> None:
    # A well-formed bundle whose manifest lists four million packages: ~90 MB of msgpack,
    # gigabytes once decoded into Python strings.
    names = [f"forged-package-{n:08d}" for n in range(4_000_000)]
    _store(prefix, bundle_id, _tar_of((tar_member("python/m.py"), b"x = 1\n")), packages=names)


MANIFESTS = {
    "chunks_off": (_manifest_chunks_off, "manifest says 2 chunks"),
    "garbage": (_manifest_garbage, "manifest"),
    "wrong_types": (_manifest_wrong_types, "manifest"),
    "other_bundles_chunks": (_manifest_of_other_chunks, "incomplete in the store"),
    "packages_huge": (_manifest_packages_huge, "manifest is"),
    "negative_size": (lambda p, b: _store(p, b, b"", size=-1, chunks=-1), "hash check"),
}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_a_forged_manifest_is_refused_as_the_steps_bundle_error(
    name: str,
    prefix: str,
    cache: Path,
    worker: Daemon,
    tmp_path: Path,
    witnesses: Witnesses,
) -> None:
    forge, said = MANIFESTS[name]
    path, bundle_id = _integration(tmp_path, name.replace("_", "-"))
    forge(prefix, bundle_id)
    result = submit_wait(path, prefix, None)
    assert result["status"] == "failed", result
    assert result["error"]["type"] == "bundle", result["error"]
    assert f"bundle {bundle_id[:12]}" in result["error"]["message"], result["error"]
    assert said in result["error"]["message"], result["error"]
    assert _peak_mb(worker.pid) < DAEMON_PEAK_MB_MAX
    _assert_worker_unharmed(worker, cache, tmp_path, prefix, witnesses, bundle_id)


def test_a_bundle_id_with_path_characters_names_no_directory(
    prefix: str, cache: Path, worker: Daemon, tmp_path: Path, witnesses: Witnesses
) -> None:
    """The Integration in Redis names a bundle id the client never computed: `../` and a
    name, with a manifest and a well-formed archive stored under it."""
    path, _ = _integration(tmp_path, "path-id")
    escaped = f"escaped-{uuid.uuid4().hex[:8]}"
    bundle_id = "../" + escaped
    _store(prefix, bundle_id, _tar_of((tar_member("python/m.py"), b"x = 1\n")))
    integration = Integration.load(path)
    steps = [msgspec.structs.replace(step, bundle=bundle_id) for step in integration.steps]
    forged = msgspec.structs.replace(integration, steps=steps)

    async def run() -> Any:
        async with Client.connect(SHARED_REDIS_URL, prefix) as client:
            return await client.run(forged, None, timeout=60)

    result = asyncio.run(run())
    assert result.status == "failed", result
    assert result.error is not None and result.error.type == "bundle", result.error
    assert "not a bundle id: '../escaped-" in result.error.message
    assert not (cache.parent / escaped).exists()
    assert not (cache / ".staging" / escaped).exists()
    _assert_worker_unharmed(worker, cache, tmp_path, prefix, witnesses)


MODES_STEP = """import os, sys

def run(input, ctx):
    python = sys.path[0]
    seen = {}
    for name in ("python", "python/tool", "python/open"):
        st = os.stat(os.path.join(os.path.dirname(python), name))
        seen[name] = oct(st.st_mode & 0o7777)
    try:
        open(os.path.join(python, "open", "planted.py"), "w").write("x = 1")
        seen["write"] = "done"
    except OSError as exc:
        seen["write"] = type(exc).__name__
    return seen
"""


def test_a_forged_archives_modes_reach_no_step(
    prefix: str, cache: Path, worker: Daemon, tmp_path: Path, witnesses: Witnesses
) -> None:
    """Setuid, setgid, sticky and world-write bits asked for by the archive: the step finds
    root's files 0755 and directories 0755, and cannot write into the one asked 0777."""
    path, bundle_id = _integration(tmp_path, "modes", MODES_STEP)
    archive = _tar_of(
        (tar_member("python", tarfile.DIRTYPE, mode=0o7777), b""),
        (tar_member("python/open", tarfile.DIRTYPE, mode=0o1777), b""),
        (tar_member("python/tool", mode=0o6777, uid=1000, gid=1000), b"#!/bin/sh\nid\n"),
    )
    _store(prefix, bundle_id, archive)
    result = submit_wait(path, prefix, None)
    assert result["status"] == "succeeded", result
    seen = result["output"]
    # EACCES (root's directory, 0755) or, in the view, EROFS (a read-only bind).
    assert seen.pop("write") in ("PermissionError", "OSError"), seen
    assert seen == {"python": "0o755", "python/tool": "0o755", "python/open": "0o755"}, seen
    unpacked = cache / bundle_id
    for name in ("python", "python/tool", "python/open"):
        st = (unpacked / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0), name
    assert not (unpacked / "python" / "open" / "planted.py").exists()
    witnesses.assert_unharmed()


# A module of the bundle that, imported before the step's own code runs, would be the runner's
# doing, not the step's: it forges the code-cache frame (the one frame the caller trusts to be
# the runtime's, sent between compiling and running) with code of its own, which the worker
# would hand to every later run of the same source and file name, another integration's too.
SHADOW = """import marshal, os, sys
if not getattr(sys, "_rt_started", False):
    sys.__dict__.setdefault("_rt_before", []).append(__name__)
    from sandbox import protocol
    forged = compile("def run(input, ctx):\\n    return 'poisoned'\\n", "step.py", "exec")
    os.write(3, bytes(protocol.encode_frame(protocol.Compiled(marshal.dumps(forged)))))
"""
SHADOWED_STEP = """import sys

def run(input, ctx):
    sys._rt_started = True
    return {"before": getattr(sys, "_rt_before", []), "first": sys.path[0].endswith("/python")}
"""


def test_a_bundle_shadowing_stdlib_and_runner_modules_runs_nothing_before_the_step(
    prefix: str, cache: Path, worker: Daemon, tmp_path: Path, witnesses: Witnesses
) -> None:
    """The bundle's python/ (first on sys.path) holds a module for every name of the standard
    library, the runner's own packages (sandbox, msgspec), sitecustomize, usercustomize and a
    .pth file: none of it runs before the step's code, so none can forge the code cache. Then
    another integration with the same step source and file name, and no bundle, runs its own
    code on the same worker."""
    import sys

    tree = tmp_path / "shadow-tree"
    names = {*sys.stdlib_module_names, "sandbox", "msgspec", "sitecustomize", "usercustomize"}
    for name in names:
        (tree / "python" / name).mkdir(parents=True)
        (tree / "python" / name / "__init__.py").write_text(SHADOW)
    (tree / "python" / "zz-shadow.pth").write_text("import sitecustomize\n")
    from runnerd import bundle_archive

    path, bundle_id = _integration(tmp_path, "shadow", SHADOWED_STEP)
    _store(prefix, bundle_id, bundle_archive.pack(tree))
    result = submit_wait(path, prefix, None)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"before": [], "first": True}, result["output"]
    sibling = write(
        tmp_path / "sibling",
        {"name": "sibling", "steps": [{"name": "step", "code": "step.py"}]},
        {"step.py": SHADOWED_STEP},
    )
    for _ in range(2):  # the first compiles (or takes the cache); the second takes the cache
        again = submit_wait(sibling, prefix, None)
        assert again["status"] == "succeeded", again
        assert again["output"] == {"before": [], "first": False}, again["output"]
    witnesses.assert_unharmed()


# --- a package planted above the cache ---------------------------------------------------------

LEAKY_INDEX = (
    "exports.own = () => require('inner');\n"  # in the bundle: found
    "exports.foreign = () => require('planted');\n"  # not in the bundle: planted above it
)
LEAKY_STEP = (
    "const leaky = require('leaky');\n"
    "exports.run = () => {\n"
    "  let foreign;\n"
    "  try { foreign = leaky.foreign(); } catch (err) { foreign = `refused: ${err.message}`; }\n"
    "  return { own: leaky.own(), foreign };\n"
    "};\n"
)


def _package(name: str, index: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    manifest = f'{{"name": "{name}", "version": "1.0.0", "main": "index.js"}}'.encode()
    return [
        (tar_member(f"node_modules/{name}/package.json"), manifest),
        (tar_member(f"node_modules/{name}/index.js"), index.encode()),
    ]


def test_a_bundles_package_is_not_handed_a_module_planted_above_the_cache(
    served: Served, tmp_path: Path, witnesses: Witnesses
) -> None:
    """A package of a bundle requires a name the bundle lacks. Node looks for it in the
    node_modules of every directory above the package; above the bundle are the cache's
    parents, and a parent that every uid may write to (as /var/tmp is) is one where another
    customer's step, outside a filesystem view, can plant that name. Lookups stop at the
    bundle's root: the bundle's own packages are found, the planted one is not."""
    nest = Path("/var/tmp") / f"runnerd-nest-{uuid.uuid4().hex[:8]}"
    nest.mkdir()
    nest.chmod(0o1777)  # as /var/tmp: any uid may add to it
    planted = nest / "node_modules" / "planted"
    planted.mkdir(parents=True)
    (planted / "index.js").write_text("module.exports = 'planted code ran';\n")
    # A prefix and worker of its own: the module's worker, its cache elsewhere, must not be
    # the one that takes this execution.
    prefix = f"tf{uuid.uuid4().hex[:12]}"
    daemon = start_worker(tmp_path, prefix, nest / "cache", profile=served.profile)
    try:
        spec = {
            "name": "leaky",
            "dependencies": {"npm": {"forged-leaky": "1.0.0"}},
            "steps": [{"name": "step", "code": "step.cjs", "runtime": "node"}],
        }
        path = write(tmp_path / "leaky", spec, {"step.cjs": LEAKY_STEP})
        bundle_id = Integration.load(path).steps[0].bundle
        archive = _tar_raw(
            *_package("leaky", LEAKY_INDEX), *_package("inner", "module.exports = 'inner';\n")
        )
        _store(prefix, bundle_id, gzip.compress(archive))

        result = submit_wait(path, prefix, None)

        assert result["status"] == "succeeded", result
        assert result["output"]["own"] == "inner"
        foreign = result["output"]["foreign"]
        assert foreign.startswith("refused: Cannot find module 'planted'"), foreign
        assert daemon.is_alive()
        witnesses.assert_unharmed()
    finally:
        daemon.stop()
        shutil.rmtree(nest, ignore_errors=True)
        client = redis.Redis.from_url(SHARED_REDIS_URL)
        delete_keys(client, f"{{{prefix}*")
        delete_keys(client, f"{prefix}*")
        client.close()
