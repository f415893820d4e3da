# mypy: disable-error-code="import-not-found,untyped-decorator,no-any-return"
# (run in the peers' own venvs, bench/peers.py: their libraries are not in this one)
"""RQ: the tasks its workers import (`rq worker --path bench/peer_apps`) and the caller.

The chain uses RQ's own job dependencies: each step is enqueued with `depends_on` the previous
one, the worker enqueues it when that one finishes, and the step reads its input from the
dependency's stored result.
"""

from __future__ import annotations

from typing import Any

import steps
from redis import Redis
from rq import Queue, get_current_job
from rq.results import Result

RESULT_TTL_S = 120


def trivial(n: int) -> dict[str, Any]:
    return steps.trivial(n)


def chain_first(n: int) -> dict[str, Any]:
    return steps.chain_step(steps.chain_input(n))


def chain_next() -> dict[str, Any]:
    job = get_current_job()
    assert job is not None and job.dependency is not None
    return steps.chain_step(job.dependency.return_value())


class Caller:
    """Blocking calls, one per thread; redis-py's connection pool is shared safely."""

    def __init__(self, redis_url: str, queue: str, timeout_s: int) -> None:
        self.redis = Redis.from_url(redis_url)
        self.queue = Queue(queue, connection=self.redis)
        self.timeout_s = timeout_s

    def trivial(self, n: int) -> Any:
        return self._wait(self.queue.enqueue(trivial, n, result_ttl=RESULT_TTL_S))

    def chain(self, n: int) -> Any:
        job = self.queue.enqueue(chain_first, n, result_ttl=RESULT_TTL_S)
        for _ in range(steps.CHAIN_STEPS - 1):
            job = self.queue.enqueue(chain_next, depends_on=job, result_ttl=RESULT_TTL_S)
        return self._wait(job)

    def _wait(self, job: Any) -> Any:
        # Blocks on the job's result stream (XREAD), no polling.
        result = job.latest_result(timeout=self.timeout_s)
        if result is None or result.type != Result.Type.SUCCESSFUL:
            raise RuntimeError(f"rq job {job.id}: {result and result.exc_string or 'no result'}")
        return result.return_value

    def close(self) -> None:
        self.redis.close()
