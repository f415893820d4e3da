"""The worker registry (runnerd/registry.py) as a real `runnerd serve` keeps it: listed with its
concurrency and in-flight count while it runs, marked draining on SIGTERM, gone once stopped."""

from __future__ import annotations

import signal
import time

import redis

import runnerd
from runnerd.client import open_redis
from runnerd.keys import Keys
from runnerd.messages import encoder
from runnerd.registry import WorkerInfo, announce, live_workers
from tests.runnerd.conftest import (
    SHARED_REDIS_URL,
    ServeFactory,
    run_async,
    submit_all,
    wait_all,
    wait_for,
)
from tests.runnerd.test_http import SLEEPY


def workers(prefix: str) -> dict[str, WorkerInfo]:
    async def go() -> list[WorkerInfo]:
        client = await open_redis(SHARED_REDIS_URL)
        try:
            return await live_workers(client, Keys(prefix, 1))
        finally:
            await client.aclose()

    return {info.worker_id: info for info in run_async(go())}


def test_a_worker_is_listed_while_it_runs_and_gone_once_stopped(
    serve: ServeFactory, prefix: str
) -> None:
    daemon = serve(concurrency=3, drain_s=20)
    info = wait_for(lambda: workers(prefix).get(daemon.worker_id), 10, "the announcement")
    assert (info.concurrency, info.partitions, info.pid) == (3, 1, daemon.pid)
    assert info.version == runnerd.__version__ and not info.draining
    (execution_id,) = run_async(submit_all(SHARED_REDIS_URL, prefix, SLEEPY, [6]))
    wait_for(lambda: workers(prefix)[daemon.worker_id].in_flight == 1, 10, "in_flight 1 announced")
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: workers(prefix)[daemon.worker_id].draining, 3, "draining announced")
    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id]))
    assert result.ok
    assert daemon.wait(30) == 0
    assert daemon.worker_id not in workers(prefix)


def test_stale_and_undecodable_fields_are_skipped_and_stale_ones_dropped(
    prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 1)
    now = time.time()
    old = WorkerInfo("w-old", "h", 1, "0", 8, 0, 1, now - 300, now - 300)
    shared_redis.hset(keys.workers(), mapping={"w-old": encoder.encode(old), "junk": b"\xc1"})
    assert workers(prefix) == {}

    async def go() -> None:
        client = await open_redis(SHARED_REDIS_URL)
        try:
            await announce(client, keys, WorkerInfo("w-new", "h", 2, "0", 4, 1, 1, now, now))
        finally:
            await client.aclose()

    run_async(go())
    assert set(workers(prefix)) == {"w-new"}
    assert set(shared_redis.hkeys(keys.workers())) == {b"w-new", b"junk"}
