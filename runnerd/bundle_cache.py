"""A worker's local cache of unpacked bundles: fetched from the store on first use, checked
against their manifest, unpacked once, kept under a size cap, least recently used evicted.

Layout of `RUNNERD_BUNDLE_CACHE_DIR` (root's; the step uids may pass through it, not list it):

    <dir>/                    0711: a step reaches a bundle by its id only
    <dir>/<id>/               0755, files 0644/0755, all root's: node_modules/, python/
    <dir>/.locks/<id>.lock    an flock per bundle; holds its unpacked size; mtime = last use
    <dir>/.staging/           0700: unpacked here, then renamed into place
    <dir>/.trash/             0700: evicted bundles, renamed here, then deleted

Each step holds a shared flock on its bundle's lock while it runs; unpacking and eviction take
it exclusively (eviction only without waiting: a bundle in use is skipped). flock(2) locks
belong to open files, so the same rules hold between executions of one worker and between
workers that share the directory. A bundle appears by rename(2), whole or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runnerd import bundle_archive
from runnerd.bundle_store import BundleCorrupt, BundleManifest, BundleStore
from runnerd.metrics import Metrics
from runnerd.settings import Settings

log = logging.getLogger("runnerd.bundles")
TOUCH_EVERY_S = 10.0  # a bundle's last use is written at most this often per worker
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def for_worker(settings: Settings, store: BundleStore, metrics: Metrics) -> BundleCache | None:
    """The worker's cache, its directory made; None (steps with a bundle then fail, saying
    so) when the directory cannot be made: a worker without bundles still runs the rest."""
    try:
        BundleCache.prepare(settings.bundle_cache_dir)
    except OSError as exc:
        log.warning(
            "no bundle cache: %s: %s (RUNNERD_BUNDLE_CACHE_DIR)",
            settings.bundle_cache_dir,
            exc.strerror or exc,
        )
        return None
    mb = 1024 * 1024
    return BundleCache(
        settings.bundle_cache_dir,
        settings.bundle_cache_mb * mb,
        settings.bundle_max_mb * mb,
        store,
        metrics,
    )


class BundleUnavailable(Exception):
    """The step cannot have its bundle; the message is the step's error."""


@dataclass
class Lease:
    """A bundle in use by one step: its directory, held against eviction until released."""

    path: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the shared flock
            self.fd = -1


class BundleCache:
    def __init__(
        self,
        root: str,
        cap_bytes: int,
        size_max: int,
        store: BundleStore,
        metrics: Metrics | None = None,
    ) -> None:
        self.root = Path(root)
        self.cap_bytes = cap_bytes
        self.size_max = size_max
        self.store = store
        self.metrics = metrics
        self._fetching: dict[str, asyncio.Lock] = {}
        self._touched: dict[str, float] = {}

    @staticmethod
    def prepare(root: str) -> None:
        """Make the layout (before the zygote starts: it binds `root` into the view)."""
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o711)
        for name in (".locks", ".staging", ".trash"):
            (path / name).mkdir(mode=0o700, exist_ok=True)
            os.chmod(path / name, 0o700)

    async def acquire(self, bundle_id: str) -> Lease:
        """The bundle, ready to read; BundleUnavailable says why not."""
        if not re.fullmatch(r"[0-9a-f]{64}", bundle_id):  # it names a directory
            raise BundleUnavailable(f"not a bundle id: {bundle_id[:80]!r}")
        lease = self._lease(bundle_id)
        if lease is not None:
            self._count_hit()
            return lease
        lock = self._fetching.setdefault(bundle_id, asyncio.Lock())
        async with lock:  # one fetch per bundle in this worker; the others wait for it
            lease = self._lease(bundle_id)
            if lease is not None:
                self._count_hit()
                return lease
            started = time.perf_counter()
            manifest, archive = await self._fetch(bundle_id)
            await asyncio.to_thread(self._install, bundle_id, manifest, archive)
            if self.metrics is not None:
                self.metrics.bundle_fetches.labels("fetched").inc()
                self.metrics.bundle_fetch_duration.observe(time.perf_counter() - started)
            log.info(
                "bundle %s fetched and unpacked in %.1f ms (%d bytes)",
                bundle_id[:12],
                (time.perf_counter() - started) * 1000,
                manifest.size,
            )
        self._fetching.pop(bundle_id, None)
        lease = self._lease(bundle_id)
        if lease is None:  # evicted at once by a cache too small for it
            raise BundleUnavailable(f"bundle {bundle_id[:12]} was evicted as it was unpacked")
        return lease

    def _lease(self, bundle_id: str) -> Lease | None:
        """The fast path: a shared lock without waiting, and the directory there."""
        path = self.root / bundle_id
        fd = os.open(self._lock_path(bundle_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # being unpacked or evicted: the slow path waits
            os.close(fd)
            return None
        if not path.is_dir():
            os.close(fd)
            return None
        now = time.monotonic()
        if now - self._touched.get(bundle_id, 0.0) > TOUCH_EVERY_S:
            self._touched[bundle_id] = now
            os.utime(fd)
        return Lease(str(path), fd)

    async def _fetch(self, bundle_id: str) -> tuple[BundleManifest, bytes]:
        short = bundle_id[:12]
        try:
            manifest = await self.store.manifest(bundle_id)
        except BundleCorrupt as exc:
            self._count("corrupt")
            raise BundleUnavailable(f"bundle {short} is corrupt in the store: {exc}") from exc
        if manifest is None:
            self._count("missing")
            raise BundleUnavailable(
                f"bundle {short} is not stored (deleted since submit?): build it again with "
                "`runnerd bundle build INTEGRATION.json`"
            )
        if max(manifest.size, manifest.unpacked_bytes) > self.size_max:
            self._count("too_large")
            raise BundleUnavailable(
                f"bundle {short} ({', '.join(manifest.packages)}) is "
                f"{max(manifest.size, manifest.unpacked_bytes) / 2**20:.1f} MB, over this "
                f"worker's limit of {self.size_max // 2**20} MB (RUNNERD_BUNDLE_MAX_MB)"
            )
        if manifest.python and manifest.python != PYTHON:
            self._count("invalid")
            raise BundleUnavailable(
                f"bundle {short} was built for Python {manifest.python}, this worker runs "
                f"{PYTHON}: build it with the workers' Python"
            )
        try:
            archive = await self.store.fetch(bundle_id, manifest)
        except BundleCorrupt as exc:
            self._count("corrupt")
            raise BundleUnavailable(
                f"bundle {short} ({', '.join(manifest.packages)}) failed its hash check: {exc}"
            ) from exc
        if archive is None:
            self._count("missing")
            raise BundleUnavailable(f"bundle {short} is incomplete in the store: build it again")
        return manifest, archive

    def _install(self, bundle_id: str, manifest: BundleManifest, archive: bytes) -> None:
        """Under the bundle's exclusive lock: unpack into staging, rename into place."""
        fd = os.open(self._lock_path(bundle_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another worker unpacking it: wait for it
            final = self.root / bundle_id
            if final.is_dir():
                return
            staging = Path(
                self.root, ".staging", f"{bundle_id}-{os.getpid()}-{os.urandom(4).hex()}"
            )
            staging.mkdir(mode=0o700)
            try:
                size = bundle_archive.unpack(archive, staging, self.size_max)
            except BaseException as exc:
                # Whatever stopped it, its files go: .staging is outside the cache's cap, and
                # an archive that broke the unpacking after writing would leave up to
                # RUNNERD_BUNDLE_MAX_MB there on every delivery, until the disk is full.
                shutil.rmtree(staging, ignore_errors=True)
                if not isinstance(exc, bundle_archive.ArchiveError):
                    raise
                self._count("invalid")
                raise BundleUnavailable(
                    f"bundle {bundle_id[:12]} ({', '.join(manifest.packages)}) refused: {exc}"
                ) from exc
            os.chmod(staging, 0o755)
            os.rename(staging, final)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(size).encode(), 0)
        finally:
            os.close(fd)
        self._evict(keep=bundle_id)

    def _evict(self, keep: str) -> None:
        """Past the cap, the least recently used bundles not in use go, oldest first."""
        entries = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            lock = self._lock_path(path.name)
            with contextlib.suppress(OSError, ValueError):
                entries.append((lock.stat().st_mtime, int(lock.read_text() or 0), path.name))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total <= self.cap_bytes:
                break
            if name != keep and self._remove(name):
                total -= size

    def _remove(self, bundle_id: str) -> bool:
        fd = os.open(self._lock_path(bundle_id), os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # a step reads it now
        try:
            trash = Path(self.root, ".trash", f"{bundle_id}-{os.urandom(4).hex()}")
            os.rename(self.root / bundle_id, trash)
        except OSError:
            os.close(fd)
            return False
        os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        self._touched.pop(bundle_id, None)
        if self.metrics is not None:
            self.metrics.bundle_evictions.inc()
        log.info("bundle %s evicted from the cache", bundle_id[:12])
        return True

    def _lock_path(self, bundle_id: str) -> Path:
        return self.root / ".locks" / f"{bundle_id}.lock"

    def _count_hit(self) -> None:
        if self.metrics is not None:
            self.metrics.bundle_fetches.labels("cached").inc()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.bundle_fetches.labels(outcome).inc()
