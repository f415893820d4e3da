"""Scenario `bundles`: what a dependency bundle adds to a step, cached and on first use.

Per-step cost: a trivial step (returns its input) with and without a bundle that is already
unpacked in the worker's cache, Python and JavaScript, through `Spawner.run_step` with warm
children, as the executor calls it. With a bundle a step also takes its lease (a shared flock
on the bundle's lock file, the directory checked) and its child gets the bundle on its import
path. Each repetition runs both variants in turn (order rotating); the figure is the median of
each repetition's median, and the difference is taken within a repetition.

First use: a ~5 MB bundle (incompressible files, so the archive is ~5 MB too) stored in the
local Redis, fetched into an empty cache, checked against its SHA-256 and unpacked: the time
`BundleCache.acquire` takes, median over the repetitions, each into a fresh cache.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.measure import time_steps
from runnerd import bundle_archive
from runnerd.bundle_cache import BundleCache
from runnerd.bundle_store import BundleManifest, RedisBundleStore, chunks_of
from runnerd.connection import open_redis
from runnerd.keys import Keys
from runnerd.spawner import Spawner, StepSpec
from runnerd.zygote_link import SandboxOptions

HELP = "what a cached dependency bundle adds to a step's start; a 5 MB bundle's first use"
SOURCES = {
    "python": ("step.py", "def run(input, ctx):\n    return input\n"),
    "node": ("step.js", "module.exports.run = (input) => input;\n"),
}
BIG_MB = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )


def run(args: argparse.Namespace, command: str) -> int:
    steps, first = asyncio.run(_measure(args))
    lines = [
        "| runtime | no bundle (ms, median) | cached bundle (ms, median) | added (ms) |",
        "|---|---|---|---|",
    ]
    for runtime, (plain, bundled, added) in steps.items():
        lines.append(f"| {runtime} | {plain:.3f} | {bundled:.3f} | {added:+.3f} |")
    lines.append("")
    lines.append(
        f"First use of a {first['archive_mb']:.1f} MB bundle ({first['files']:.0f} files): "
        "fetched, "
        f"checked and unpacked in {first['median_ms']:.1f} ms (median of {first['runs']:.0f}; "
        f"min {first['min_ms']:.1f}, max {first['max_ms']:.1f})"
    )
    if args.markdown:
        print(f"`{command}`, {args.repeat} repetitions x {args.steps} steps\n")
    print("\n".join(lines))
    return 0


async def _measure(
    args: argparse.Namespace,
) -> tuple[dict[str, tuple[float, float, float]], dict[str, float]]:
    redis = await open_redis(args.redis_url)
    keys = Keys(f"bench-bundles-{uuid.uuid4().hex[:8]}", 1)
    store = RedisBundleStore(redis, keys)
    work = Path(tempfile.mkdtemp(prefix="runnerd-bench-bundles-"))
    try:
        small = await _store(store, work / "small", files=3, file_bytes=1024)
        big = await _store(store, work / "big", files=BIG_MB * 64, file_bytes=16 * 1024)
        steps = await _per_step(args, store, work / "cache", small)
        first_use = await _first_use(args, store, work, big)
    finally:
        await redis.delete(*[key async for key in redis.scan_iter(match=f"{{{keys.prefix}*")])
        await redis.aclose()
        shutil.rmtree(work, ignore_errors=True)
    return steps, first_use


@dataclass(frozen=True)
class Stored:
    bundle_id: str
    manifest: BundleManifest
    files: int


async def _store(store: RedisBundleStore, root: Path, files: int, file_bytes: int) -> Stored:
    for index in range(files):
        path = root / "python" / f"pkg{index // 64}" / f"m{index}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(file_bytes))
    archive = bundle_archive.pack(root)
    bundle_id = hashlib.sha256(root.name.encode() + os.urandom(8)).hexdigest()
    manifest = BundleManifest(
        sha256=hashlib.sha256(archive).hexdigest(),
        size=len(archive),
        chunks=chunks_of(len(archive)),
        unpacked_bytes=files * file_bytes,
        packages=[root.name],
    )
    await store.put(bundle_id, manifest, archive)
    return Stored(bundle_id, manifest, files)


async def _per_step(
    args: argparse.Namespace, store: RedisBundleStore, cache_dir: Path, small: Stored
) -> dict[str, tuple[float, float, float]]:
    BundleCache.prepare(str(cache_dir))
    cache = BundleCache(str(cache_dir), 1 << 30, 1 << 30, store)
    bundle_id = small.bundle_id
    await cache.acquire(bundle_id)  # unpacked once: from here on every lease is a cache hit
    uid_base = int(os.environ.get("RUNNERD_SANDBOX_UID_BASE", "0"))
    node = shutil.which("node") or ""
    options = SandboxOptions(uid_base, 16, node, bundle_dir=str(cache_dir))
    spawner = await Spawner.start(options, pool_size=2, bundles=cache)
    figures: dict[str, tuple[float, float, float]] = {}
    try:
        for runtime, (filename, source) in SOURCES.items():
            plain_ms, bundled_ms, added_ms = [], [], []
            for repetition in range(args.repeat):
                medians: dict[str, float] = {}
                order = ["", bundle_id] if repetition % 2 == 0 else [bundle_id, ""]
                for bundle in order:
                    spec = StepSpec(runtime, filename, source, bundle=bundle)  # type: ignore[arg-type]

                    async def one(_: int, spec: StepSpec = spec) -> None:
                        outcome = await spawner.run_step(spec)
                        assert outcome.ok, outcome.error

                    await time_steps(one, args.warmup)
                    medians[bundle] = statistics.median(await time_steps(one, args.steps))
                plain_ms.append(medians[""])
                bundled_ms.append(medians[bundle_id])
                added_ms.append(medians[bundle_id] - medians[""])
            figures[runtime] = (
                statistics.median(plain_ms),
                statistics.median(bundled_ms),
                statistics.median(added_ms),
            )
    finally:
        await spawner.close()
    return figures


async def _first_use(
    args: argparse.Namespace, store: RedisBundleStore, work: Path, big: Stored
) -> dict[str, float]:
    bundle_id, manifest, files = big.bundle_id, big.manifest, big.files
    times = []
    for repetition in range(args.repeat):
        cache_dir = work / f"first-{repetition}"
        BundleCache.prepare(str(cache_dir))
        cache = BundleCache(str(cache_dir), 1 << 30, 1 << 30, store)
        started = asyncio.get_running_loop().time()
        (await cache.acquire(str(bundle_id))).release()
        times.append((asyncio.get_running_loop().time() - started) * 1000)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "archive_mb": manifest.size / 2**20,
        "files": float(files),
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": float(len(times)),
    }
