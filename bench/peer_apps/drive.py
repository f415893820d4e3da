# mypy: disable-error-code="import-not-found,untyped-decorator,no-any-return"
# (run in the peers' own venvs, bench/peers.py: their libraries are not in this one)
"""Drive one peer from inside its own environment: `python drive.py SYSTEM [flags]`.

Waits for the peer's workers (one call answered), warms up, then measures the two scenarios the
harness compares: `--throughput` trivial calls from `--clients` concurrent callers (closed
loop), and `--chain` 6-step chains one at a time; each stops early after `--max-seconds`. Every
result is checked. Prints one JSON object on stdout: latencies in ms, elapsed seconds, and the
versions of the packages measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import steps

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for bench.progress
from bench.progress import Progress  # noqa: E402

READY_TIMEOUT_S = 60
RESULT_TIMEOUT_S = 120
PACKAGES = ("rq", "arq", "celery", "kombu", "billiard", "redis", "hiredis")
Call = Callable[[int], Awaitable[Any]]


async def closed_loop(
    call: Call, expected: Callable[[int], Any], count: int, clients: int, max_s: float, label: str
) -> dict[str, Any]:
    numbers = itertools.count()
    latencies: list[float] = []
    progress = Progress(label, count)
    deadline = time.perf_counter() + max_s

    async def caller() -> None:
        while (n := next(numbers)) < count and time.perf_counter() < deadline:
            started = time.perf_counter()
            got = await call(n)
            latencies.append((time.perf_counter() - started) * 1000)
            if got != expected(n):
                raise SystemExit(f"wrong result for {n}: {str(got)[:200]}")
            progress.advance()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    progress.close()
    return {"elapsed_s": elapsed, "latencies_ms": latencies}


def callers(system: str, args: argparse.Namespace) -> tuple[Call, Call, Callable[[], Any]]:
    """(trivial, chain, close) as coroutines; blocking clients run in threads."""
    if system == "arq":
        import arq_side

        caller = asyncio.get_event_loop().run_until_complete(
            arq_side.Caller.open(args.redis_url, args.queue, RESULT_TIMEOUT_S)
        )
        return caller.trivial, caller.chain, caller.close
    if system == "rq":
        import rq_side

        blocking: Any = rq_side.Caller(args.redis_url, args.queue, RESULT_TIMEOUT_S)
    elif system == "celery":
        import celery_side

        blocking = celery_side.Caller(RESULT_TIMEOUT_S)
    else:
        raise SystemExit(f"unknown system {system!r}")

    async def trivial(n: int) -> Any:
        return await asyncio.to_thread(blocking.trivial, n)

    async def chain(n: int) -> Any:
        return await asyncio.to_thread(blocking.chain, n)

    async def close() -> None:
        blocking.close()

    return trivial, chain, close


async def measure(trivial: Call, chain: Call, args: argparse.Namespace) -> dict[str, Any]:
    await asyncio.wait_for(trivial(-1), READY_TIMEOUT_S)  # the workers are up
    label = f"{args.label}:"
    await closed_loop(
        trivial, steps.trivial, args.warmup, args.clients, args.max_seconds, f"{label} warm-up"
    )
    found: dict[str, Any] = {}
    if args.throughput:
        found["throughput"] = await closed_loop(
            trivial,
            steps.trivial,
            args.throughput,
            args.clients,
            args.max_seconds,
            f"{label} throughput",
        )
    if args.chain:
        found["chain"] = await closed_loop(
            chain, steps.expected_chain, args.chain, 1, args.max_seconds, f"{label} chain"
        )
    return found


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    found["python"] = sys.version.split()[0]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=("rq", "arq", "celery"))
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--label", default="")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--throughput", type=int, default=0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--chain", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    args = parser.parse_args()
    args.label = args.label or args.system
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Enough threads for every blocking caller at once.
    from concurrent.futures import ThreadPoolExecutor

    loop.set_default_executor(ThreadPoolExecutor(max_workers=max(args.clients, 4)))
    trivial, chain, close = callers(args.system, args)
    try:
        found = loop.run_until_complete(measure(trivial, chain, args))
    finally:
        loop.run_until_complete(close())
    found["versions"] = versions()
    print(json.dumps(found))


if __name__ == "__main__":
    main()
