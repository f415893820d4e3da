# mypy: disable-error-code="import-not-found,untyped-decorator,no-any-return"
# (run in the peers' own venvs, bench/peers.py: their libraries are not in this one)
"""arq: the worker settings (`python arq_side.py` runs a worker) and the caller.

arq has no job dependencies, so the caller runs the chain: it waits for each step's result and
enqueues the next step with it. The worker polls its queue every `poll_delay` (0.5 s as shipped;
BENCH_ARQ_POLL_DELAY sets a shorter one); the caller polls each result every 5 ms.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import steps
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import run_worker

CALLER_POLL_S = 0.005
KEEP_RESULT_S = 120


async def trivial(ctx: dict[str, Any], n: int) -> dict[str, Any]:
    return steps.trivial(n)


async def chain_step(ctx: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    return steps.chain_step(state)


def _worker_settings() -> type:
    attributes: dict[str, Any] = {
        "functions": [trivial, chain_step],
        "queue_name": os.environ.get("BENCH_QUEUE", "arq:queue"),
        "redis_settings": RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://")),
        "keep_result": KEEP_RESULT_S,
        "handle_signals": True,
    }
    if os.environ.get("BENCH_ARQ_POLL_DELAY"):
        attributes["poll_delay"] = float(os.environ["BENCH_ARQ_POLL_DELAY"])
    return type("WorkerSettings", (), attributes)


WorkerSettings = _worker_settings()


class Caller:
    """Async calls; one pool shared by every caller task."""

    def __init__(self, pool: ArqRedis, timeout_s: int) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    @classmethod
    async def open(cls, redis_url: str, queue: str, timeout_s: int) -> Caller:
        pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue)
        return cls(pool, timeout_s)

    async def trivial(self, n: int) -> Any:
        return await self._call("trivial", n)

    async def chain(self, n: int) -> Any:
        state = steps.chain_input(n)
        for _ in range(steps.CHAIN_STEPS):
            state = await self._call("chain_step", state)
        return state

    async def _call(self, name: str, argument: Any) -> Any:
        job = await self.pool.enqueue_job(name, argument)
        assert job is not None
        return await job.result(timeout=self.timeout_s, poll_delay=CALLER_POLL_S)

    async def close(self) -> None:
        await self.pool.aclose()


if __name__ == "__main__":
    # As `arq arq_side.WorkerSettings` does, but logging warnings only (as every system
    # measured does): arq logs two lines per job at INFO.
    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)
