"""Where built bundles are kept for workers to fetch: an interface, and Redis behind it.

`BundleStore` is what the rest of runnerd calls (`manifest`, `fetch`, `put`), so that bundles
can live on S3 or elsewhere later without touching the build, the submit check or the cache.
`RedisBundleStore` keeps each bundle as chunks of CHUNK_BYTES under its own hash tag (see
runnerd/keys.py) plus a manifest written last: Redis caps one value at 512 MB, and a chunked
value is read without a single huge reply. Bundles have no TTL: an operator deletes them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import msgspec

from runnerd.connection import RedisClient
from runnerd.keys import Keys

CHUNK_BYTES = 4 * 1024 * 1024
# A build's manifest is a few hundred bytes: a hash, four numbers and the names it was asked
# for. Larger is not one a build wrote, and decoding it could cost the worker gigabytes.
MANIFEST_MAX = 1024 * 1024


class BundleManifest(msgspec.Struct, frozen=True):
    """What a worker checks a fetched archive against, and unpacks it within."""

    sha256: str  # of the archive's bytes
    size: int
    chunks: int
    unpacked_bytes: int
    python: str = ""  # major.minor of the interpreter its pip part was built for ("": none)
    packages: list[str] = []  # what was asked for, for messages


_manifest_decoder = msgspec.msgpack.Decoder(BundleManifest)


class BundleCorrupt(Exception):
    """A fetched archive does not match its manifest (the message says how)."""


class BundleStore(Protocol):
    async def manifest(self, bundle_id: str) -> BundleManifest | None:
        """The manifest, None when the bundle is not stored."""

    async def fetch(self, bundle_id: str, manifest: BundleManifest) -> bytes | None:
        """The archive, checked against `manifest` (BundleCorrupt); None once gone."""

    async def put(self, bundle_id: str, manifest: BundleManifest, archive: bytes) -> bool:
        """Store the bundle unless stored already; False then (its content stays)."""


class RedisBundleStore:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def manifest(self, bundle_id: str) -> BundleManifest | None:
        raw: Any = await self.redis.get(self.keys.bundle_manifest(bundle_id))
        if raw is None:
            return None
        if len(raw) > MANIFEST_MAX:
            raise BundleCorrupt(f"its manifest is {len(raw)} bytes, not one a build wrote")
        try:
            return _manifest_decoder.decode(raw)
        except msgspec.DecodeError as exc:  # ValidationError too: not one a build wrote
            raise BundleCorrupt(f"its manifest is not a bundle manifest: {exc}") from exc

    async def fetch(self, bundle_id: str, manifest: BundleManifest) -> bytes | None:
        # The chunk count is the manifest's word too: checked against its size (which the
        # cache has held to RUNNERD_BUNDLE_MAX_MB), or a few bytes "in" 10**12 chunks would
        # have the worker build a list of 10**12 key names.
        if manifest.chunks != chunks_of(manifest.size):
            raise BundleCorrupt(
                f"its manifest says {manifest.chunks} chunks of {manifest.size} bytes "
                f"(a build stores {chunks_of(manifest.size)})"
            )
        keys = [
            self.keys.bundle_chunk(bundle_id, manifest.sha256, n) for n in range(manifest.chunks)
        ]
        parts: list[Any] = await self.redis.mget(keys) if keys else []
        if any(part is None for part in parts):
            return None
        archive = b"".join(part for part in parts if part is not None)
        check(archive, manifest)
        return archive

    async def put(self, bundle_id: str, manifest: BundleManifest, archive: bytes) -> bool:
        if await self.redis.exists(self.keys.bundle_manifest(bundle_id)):
            return False
        async with self.redis.pipeline(transaction=False) as pipe:
            for index in range(manifest.chunks):
                part = archive[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
                pipe.set(self.keys.bundle_chunk(bundle_id, manifest.sha256, index), part)
            await pipe.execute()
        # Last, and only if no other build got there first.
        stored = await self.redis.set(
            self.keys.bundle_manifest(bundle_id), msgspec.msgpack.encode(manifest), nx=True
        )
        return bool(stored)


def chunks_of(size: int) -> int:
    return -(-size // CHUNK_BYTES)


def check(archive: bytes, manifest: BundleManifest) -> None:
    if len(archive) != manifest.size:
        raise BundleCorrupt(f"{len(archive)} bytes fetched, the manifest says {manifest.size}")
    digest = hashlib.sha256(archive).hexdigest()
    if digest != manifest.sha256:
        raise BundleCorrupt(
            f"SHA-256 {digest[:16]}... fetched, the manifest says {manifest.sha256[:16]}..."
        )
