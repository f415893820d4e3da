"""Flags shared by the Redis scenarios: the Redis to use and how each worker is started."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Coroutine
from typing import Any

from bench.workers import WorkerOptions


def add_worker_arguments(parser: argparse.ArgumentParser, concurrency: int = 8) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis to go through (default REDIS_URL, else the local one); the run uses its "
        "own key prefix and deletes its keys",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=concurrency,
        help=f"RUNNERD_CONCURRENCY of each worker (default {concurrency})",
    )
    parser.add_argument(
        "--pool-size", type=int, default=2, help="RUNNERD_POOL_SIZE of each worker (default 2)"
    )
    parser.add_argument(
        "--uid-base",
        type=int,
        default=600_000,
        help="first step uid (default 600000; each worker gets its own slots + 1 uids after it)",
    )


def worker_options(args: argparse.Namespace) -> WorkerOptions:
    return WorkerOptions(
        redis_url=args.redis_url,
        concurrency=args.concurrency,
        pool_size=args.pool_size,
        uid_base=args.uid_base,
    )


def run_loop(coroutine: Coroutine[Any, Any, Any], loop: str) -> Any:
    """Run the harness's side (the callers) on the chosen event loop."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(_stoppable(coroutine))
    return asyncio.run(_stoppable(coroutine))


async def _stoppable(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """SIGINT or SIGTERM cancel the run, so its fleet still stops its workers and deletes its
    keys on the way out (a busy uvloop did not act on SIGINT otherwise)."""
    task = asyncio.ensure_future(coroutine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await task
