"""`runnerd bundle build INTEGRATION.json`: build the dependency bundles an integration file
declares and store them for the workers (run where the package registries are reachable)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import msgspec

from runnerd import bundle_build
from runnerd import integration as integration_module
from runnerd.bundle_store import RedisBundleStore
from runnerd.connection import open_redis
from runnerd.keys import Keys
from runnerd.outcomes import EXIT_OK
from runnerd.settings import Settings

MB = 1024 * 1024


async def build(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.integration)
    integration_module.load(path)  # every mistake in the file, with its usual message
    spec = msgspec.json.decode(path.read_bytes(), type=integration_module.IntegrationFile)
    declared = integration_module.declared_bundles(spec, path.parent, str(path))
    unique = {found.id: found for found in declared.values()}
    if not unique:
        print(f"{path}: declares no dependencies; nothing to build")
        return EXIT_OK
    redis = await open_redis(settings.redis_url)
    try:
        store = RedisBundleStore(redis, Keys(settings.key_prefix, settings.partitions))
        for bundle_id, bundle in unique.items():
            packages = ", ".join([*bundle.npm_packages, *bundle.pip_packages])
            steps = ", ".join(name for name, found in declared.items() if found.id == bundle_id)
            if await store.manifest(bundle_id) is not None:
                print(f"bundle {bundle_id[:12]} ({packages}; steps {steps}): stored already")
                continue
            archive, manifest = await asyncio.to_thread(
                bundle_build.build, bundle, settings.bundle_max_mb * MB
            )
            stored = await store.put(bundle_id, manifest, archive)
            print(
                f"bundle {bundle_id[:12]} ({packages}; steps {steps}): "
                f"{'built and stored' if stored else 'stored meanwhile by another build'}, "
                f"{manifest.size / MB:.2f} MB packed, {manifest.unpacked_bytes / MB:.2f} MB "
                f"unpacked, sha256 {manifest.sha256[:16]}..."
            )
    finally:
        await redis.aclose()
    return EXIT_OK
