"""A bundle's archive: a deterministic tar.gz out of a directory, and a safe unpacking of one.

Deterministic, so that the same files give the same bytes and the same SHA-256 on any machine:
entries sorted by path, owner 0:0 with no names, mtime 0, modes reduced to 0644 / 0755, gzip's
header without a name or time. Only regular files and directories are packed: npm's
`node_modules/.bin` links are left out (steps run no package binaries), and any other link
stops the build. No links at all, rather than links that stay inside: whether a chain of
relative links stays inside cannot be told from each link's text alone.

Unpacking trusts nothing in the archive (it came out of Redis, a bundle is customer code):
absolute paths, `..`, links, hard links, devices and fifos are refused, modes lose setuid,
setgid and sticky bits and every write bit but the owner's (root's), and the total size and
entry count are capped before anything is written past them. What the tar reader itself holds
is bounded too (`_Capped`): a header's own content (a GNU long name, a pax record) is read whole
before the member it names is seen, so 1 MB of gzip could ask it for a gigabyte.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

ENTRIES_MAX = 200_000
# The tar reader's reads of the decompressed stream: headers are read whole (a pax record or a
# GNU long name of a real bundle is a few KB), file contents in pieces of this size.
READ_MAX = 64 * 1024
# The decompressed stream beside the file contents: per entry a header, a pax header and its
# record, and the padding of the content to a 512-byte block; the end-of-archive blocks.
ENTRY_OVERHEAD = 4 * tarfile.BLOCKSIZE
STREAM_OVERHEAD = 64 * 1024


class ArchiveError(Exception):
    """The archive is not one a worker may unpack; the message says which entry and why."""


def pack(root: Path) -> bytes:
    """Every file under `root` as a deterministic tar.gz."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(root):
            tar.addfile(*_entry(root, path))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _walk(root: Path) -> list[Path]:
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if not (d == ".bin" and directory.endswith("node_modules"))
        )
        for name in sorted(dirs + files):
            found.append(Path(directory, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _entry(root: Path, path: Path) -> tuple[tarfile.TarInfo, io.BufferedReader | None]:
    name = path.relative_to(root).as_posix()
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        return info, None
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"{name}: a link or special file (a bundle holds files only)")
    info.size = st.st_size
    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    return info, path.open("rb")


def unpack(data: bytes, into: Path, size_max: int) -> int:
    """Unpack `data` into the empty directory `into`; the bytes written. ArchiveError for any
    entry a bundle may not hold, or past `size_max` bytes unpacked (nothing then is kept:
    the caller removes `into`)."""
    total = 0
    stream_max = size_max + ENTRIES_MAX * ENTRY_OVERHEAD + STREAM_OVERHEAD
    try:
        gz = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
        stream = _Capped(gz, stream_max)
        with tarfile.open(fileobj=stream, mode="r:", tarinfo=_NoSparse) as tar:
            count = 0
            while (member := tar.next()) is not None:
                # The reader keeps every member it read, each with its pax records: keep none.
                tar.members.clear()  # type: ignore[attr-defined]
                count += 1
                if count > ENTRIES_MAX:
                    raise ArchiveError(f"more than {ENTRIES_MAX} entries")
                _check(member)
                total += member.size
                if total > size_max:
                    raise ArchiveError(
                        f"unpacks to more than {size_max // 2**20} MB (RUNNERD_BUNDLE_MAX_MB)"
                    )
                _write(tar, member, into)
    except ArchiveError:
        raise
    except Exception as exc:  # noqa: BLE001
        # Whatever the tar reader fails with on bytes made to break it (zlib.error, a
        # RecursionError from a chain of pax headers, ...) is this archive's refusal, not the
        # worker's failure: the step gets its `bundle` error and the staging is removed.
        raise ArchiveError(f"not a readable bundle archive: {type(exc).__name__}: {exc}") from exc
    return total


_GLOBAL_PAX = tarfile.XGLTYPE


class _NoSparse(tarfile.TarInfo):
    """A sparse member's map is read before the member is seen, block after block with no
    bound of its own (GNU's 'S' type and pax's GNU.sparse forms): 600 MB of stream would be
    tens of millions of Python ints. A bundle never holds a sparse file; refuse it first.
    A global pax header is refused too (a build writes none): the reader copies its records
    into every later member, so 50 KB of them times 200,000 entries would be gigabytes."""

    def _proc_sparse(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        raise ArchiveError(f"{self.name!r}: a sparse file (a bundle holds plain files only)")

    def _proc_pax(self, reader: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == _GLOBAL_PAX:
            raise ArchiveError("a global pax header (a bundle's archive has none)")
        return super()._proc_pax(reader)  # type: ignore[misc,no-any-return]

    def _proc_gnusparse_00(self, *args: object) -> None:
        raise ArchiveError("a sparse file (a bundle holds plain files only)")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


class _Capped(io.RawIOBase):
    """The decompressed tar stream as the tar reader sees it: no read past READ_MAX at once,
    nothing past `limit` in all (refused before the bytes are decompressed, let alone held)."""

    def __init__(self, raw: gzip.GzipFile, limit: int) -> None:
        super().__init__()
        self.raw = raw
        self.limit = limit

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > READ_MAX:
            raise ArchiveError(f"a header of {size} bytes (a bundle's are a few KB)")
        if self.raw.tell() + size > self.limit:
            raise ArchiveError(f"a tar stream of more than {self.limit // 2**20} MB")
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # Never back: a tar read goes forward only, and a member of negative size would have
        # the reader read the same bytes again as other files, past every cap.
        if offset < self.raw.tell():
            raise ArchiveError("a member of negative size (the archive steps back)")
        if whence != io.SEEK_SET or offset > self.limit:
            raise ArchiveError(f"a tar stream of more than {self.limit // 2**20} MB")
        return self.raw.seek(offset)

    def tell(self) -> int:
        return self.raw.tell()

    def readable(self) -> bool:
        return True


def _check(member: tarfile.TarInfo) -> None:
    name = member.name
    if member.size < 0:
        raise ArchiveError(f"{name!r}: a negative size")
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or not name or "\0" in name:
        raise ArchiveError(f"{name!r}: a path outside the bundle")
    if member.issym() or member.islnk():
        raise ArchiveError(f"{name!r}: a link to {member.linkname!r} (a bundle holds files only)")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"{name!r}: a device or fifo (a bundle holds files only)")


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
    # No link is ever written, so every parent is a directory this unpacking made.
    target = into / member.name
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if member.isdir():
        target.mkdir(mode=0o755, exist_ok=True)
        os.chmod(target, 0o755)  # whatever the umask
        return
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveError(f"{member.name!r}: unreadable")
    # Root's, readable by all, writable by none but root: no setuid, setgid, sticky bits.
    mode = 0o755 if member.mode & 0o111 else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(READ_MAX):
            out.write(chunk)
    os.chmod(target, mode)  # the umask may have taken bits off
