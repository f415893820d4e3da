"""An operator's cancel (runnerd/cancel.py) against real `runnerd serve` processes: a queued
execution never runs, a running one has its step's processes killed at once and its worker
goes on, a finished one keeps its result, an unknown id is said to be unknown, and a chain
cancelled mid-way (or parked for a retry) runs no further step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from runnerd.cancel import request_cancel
from runnerd.client import open_redis
from runnerd.keys import GROUP, Keys
from runnerd.messages import ExecutionResult, Integration, result_decoder
from tests.runnerd.conftest import (
    COUNTING_STEP,
    SHARED_REDIS_URL,
    ServeFactory,
    counting_input,
    counting_integration,
    free_port,
    run_async,
    run_counts,
    run_one,
    submit_all,
    wait_for,
)
from tests.runnerd.test_http import ECHO, get, metric

RESULT_TTL_S = 3600.0
# An exec step whose process is easy to find on the host: `sleep` with an argument of its own.
NAP_ARG = "37.125"
NAP = Integration.from_dict(
    {
        "name": "nap",
        "limits": {"wall_s": 60},
        "steps": [{"name": "nap", "exec": ["sleep", NAP_ARG]}],
    }
)


def cancel(prefix: str, execution_id: str) -> tuple[str, ExecutionResult | None]:
    async def go() -> tuple[str, ExecutionResult | None]:
        client = await open_redis(SHARED_REDIS_URL)
        try:
            return await request_cancel(client, Keys(prefix, 1), execution_id, RESULT_TTL_S)
        finally:
            await client.aclose()

    return run_async(go())  # type: ignore[no-any-return]


def stored_result(shared_redis: redis.Redis, prefix: str, execution_id: str) -> ExecutionResult:
    raw: Any = shared_redis.get(Keys(prefix, 1).result(execution_id))
    assert raw is not None, f"no result for {execution_id}"
    return result_decoder.decode(raw)


def settled(shared_redis: redis.Redis, prefix: str, execution_id: str) -> bool:
    """The entry is acked and deleted, and the execution's input and checkpoint are gone."""
    keys = Keys(prefix, 1)
    pending: Any = shared_redis.xpending(keys.work(0), GROUP)
    left = shared_redis.exists(keys.input(execution_id), keys.checkpoint(execution_id))
    return pending["pending"] == 0 and shared_redis.xlen(keys.work(0)) == 0 and left == 0


def nap_processes() -> list[int]:
    """Pids of this module's `sleep NAP_ARG` processes, anywhere on the host."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", NAP_ARG.encode()] or argv[-2:-1] == [NAP_ARG.encode()]:
            found.append(int(proc.name))
    return found


def test_a_queued_execution_never_runs(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    steps = ["first", "second"]
    integration = counting_integration("queued", steps)
    (execution_id,) = run_async(
        submit_all(SHARED_REDIS_URL, prefix, integration, [counting_input(prefix)])
    )
    outcome, result = cancel(prefix, execution_id)
    assert outcome == "cancelled" and result is not None
    assert result.status == "cancelled" and result.error is not None
    assert result.error.type == "cancelled"
    assert stored_result(shared_redis, prefix, execution_id) == result
    port = free_port()
    serve(http_port=port)
    wait_for(lambda: settled(shared_redis, prefix, execution_id), 15, "the entry to be acked")
    assert run_counts(shared_redis, prefix, steps) == {"first": 0, "second": 0}
    assert stored_result(shared_redis, prefix, execution_id) == result  # the operator's, kept
    keys = Keys(prefix, 1)
    assert shared_redis.xlen(keys.dead(0)) == 0 and shared_redis.zcard(keys.delayed(0)) == 0
    text = get(port, "/metrics")[1]
    assert metric(text, "runnerd_executions_finished_total", '{status="cancelled"}') == 1
    assert metric(text, "runnerd_dead_lettered_total", '{reason="too_many_deliveries"}') == 0


def test_a_running_execution_has_its_step_killed_and_the_worker_goes_on(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    port = free_port()
    daemon = serve(http_port=port, concurrency=2)
    (execution_id,) = run_async(submit_all(SHARED_REDIS_URL, prefix, NAP, [None]))
    wait_for(nap_processes, 15, "the step's sleep to start")
    asked = time.monotonic()
    outcome, result = cancel(prefix, execution_id)
    assert outcome == "cancelled" and result is not None
    wait_for(lambda: not nap_processes(), 2.5, "the step's process to be killed")
    wait_for(lambda: settled(shared_redis, prefix, execution_id), 2.5, "the entry to be acked")
    took_s = time.monotonic() - asked
    assert took_s < 2.5, took_s
    print(f"cancel to step killed and entry acked: {took_s * 1000:.0f} ms")
    assert stored_result(shared_redis, prefix, execution_id).status == "cancelled"
    wait_for(lambda: "cancelled by an operator during step nap" in daemon.log(), 5, "its log")
    # The worker goes on: its slot is free, and the next execution runs.
    for n in range(3):
        assert run_one(ECHO, n, prefix).output == n
    text = get(port, "/metrics")[1]
    assert metric(text, "runnerd_executions_finished_total", '{status="cancelled"}') == 1
    assert metric(text, "runnerd_executions_finished_total", '{status="succeeded"}') == 3
    assert metric(text, "runnerd_executions_in_flight") == 0
    assert "runnerd_sandbox_kills_total{" not in text  # killed by the cancel, not a limit
    assert get(port, "/readyz")[0] == 200 and daemon.is_alive()


def test_a_finished_execution_keeps_its_result(
    prefix: str, serve: ServeFactory, shared_redis: redis.Redis
) -> None:
    serve()
    done = run_one(ECHO, 7, prefix)
    assert done.ok
    key = Keys(prefix, 1).result(done.execution_id)
    before = shared_redis.get(key)
    outcome, result = cancel(prefix, done.execution_id)
    assert outcome == "finished"
    assert result == stored_result(shared_redis, prefix, done.execution_id)
    assert result is not None and result.status == "succeeded"
    assert shared_redis.get(key) == before
    assert not shared_redis.exists(Keys(prefix, 1).cancel(done.execution_id))


def test_an_unknown_id_is_unknown_and_a_foreign_one_refused(
    prefix: str, shared_redis: redis.Redis
) -> None:
    unknown = Keys(prefix, 1).new_execution_id(0)
    assert cancel(prefix, unknown) == ("unknown", None)
    assert not shared_redis.exists(Keys(prefix, 1).cancel(unknown))
    assert not shared_redis.exists(Keys(prefix, 1).result(unknown))
    with pytest.raises(ValueError, match="not an execution id of this deployment"):
        cancel(prefix, "7-abc")


def test_a_chain_cancelled_mid_way_runs_no_later_step(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    steps = ["first", "second", "third"]
    integration = counting_integration("chain", steps, wall_s=60)
    data = counting_input(prefix, sleep_first_run={"second": 30})
    serve()
    (execution_id,) = run_async(submit_all(SHARED_REDIS_URL, prefix, integration, [data]))
    wait_for(lambda: run_counts(shared_redis, prefix, steps)["second"] == 1, 15, "the second step")
    assert cancel(prefix, execution_id)[0] == "cancelled"
    wait_for(lambda: settled(shared_redis, prefix, execution_id), 3, "the entry to be acked")
    time.sleep(1)  # a third step, had it started, would have counted by now
    assert run_counts(shared_redis, prefix, steps) == {"first": 1, "second": 1, "third": 0}
    assert stored_result(shared_redis, prefix, execution_id).status == "cancelled"


def test_an_execution_parked_for_a_retry_is_not_retried(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    steps = ["flaky"]
    step = {"name": "flaky", "code": str(COUNTING_STEP), "network": True}
    integration = Integration.from_dict({"name": "flaky", "retries": 3, "steps": [step]})
    serve(retry_base_s=3, retry_max_s=3)
    data = counting_input(prefix, fail=["flaky"])
    (execution_id,) = run_async(submit_all(SHARED_REDIS_URL, prefix, integration, [data]))
    keys = Keys(prefix, 1)
    wait_for(lambda: shared_redis.zcard(keys.delayed(0)) == 1, 15, "the retry to be parked")
    assert cancel(prefix, execution_id)[0] == "cancelled"
    # Promoted after its backoff (1.5-3 s), taken, and completed as cancelled without a run.
    wait_for(
        lambda: (
            shared_redis.zcard(keys.delayed(0)) == 0 and settled(shared_redis, prefix, execution_id)
        ),
        10,
        "the parked entry to be taken and acked",
    )
    assert run_counts(shared_redis, prefix, steps) == {"flaky": 1}
    assert stored_result(shared_redis, prefix, execution_id).status == "cancelled"
