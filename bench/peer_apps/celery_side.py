# mypy: disable-error-code="import-not-found,untyped-decorator,no-any-return"
# (run in the peers' own venvs, bench/peers.py: their libraries are not in this one)
"""Celery: the app its workers load (`celery -A celery_side worker`) and the caller.

Redis is both broker and result backend. The chain is Celery's own `chain()`: each task's
return value becomes the next task's argument, handed on by the worker.
"""

from __future__ import annotations

import os
from typing import Any

import steps
from celery import Celery, chain

app = Celery(
    "bench",
    broker=os.environ.get("REDIS_URL", "redis://"),
    backend=os.environ.get("REDIS_URL", "redis://"),
)
app.conf.update(
    task_default_queue=os.environ.get("BENCH_QUEUE", "celery"),
    result_expires=120,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.trivial")
def trivial(n: int) -> dict[str, Any]:
    return steps.trivial(n)


@app.task(name="bench.chain_step")
def chain_step(state: dict[str, Any]) -> dict[str, Any]:
    return steps.chain_step(state)


class Caller:
    """Blocking calls, one per thread; results arrive through the backend's pub/sub."""

    def __init__(self, timeout_s: int) -> None:
        self.timeout_s = timeout_s

    def trivial(self, n: int) -> Any:
        return trivial.delay(n).get(timeout=self.timeout_s)

    def chain(self, n: int) -> Any:
        first = chain_step.s(steps.chain_input(n))
        rest = [chain_step.s() for _ in range(steps.CHAIN_STEPS - 1)]
        return chain(first, *rest).apply_async().get(timeout=self.timeout_s)

    def close(self) -> None:
        app.close()
