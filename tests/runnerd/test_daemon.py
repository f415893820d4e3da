"""The worker's lifecycle with real `runnerd serve` processes: a worker killed mid-execution and
another resuming from the checkpoint, draining on SIGTERM, losing its Redis connections,
serving every partition."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

import redis
import uvloop

from runnerd.client import Client
from runnerd.daemon import Worker
from runnerd.keys import GROUP, Keys
from runnerd.messages import Integration
from runnerd.settings import Settings
from runnerd.store import ENTRY_FIELD
from tests.runnerd.conftest import (
    SHARED_REDIS_URL,
    RedisServer,
    ServeFactory,
    counting_input,
    counting_integration,
    run_async,
    run_counts,
    submit_all,
    wait_all,
    wait_for,
)

FIVE = ["s1", "s2", "s3", "s4", "s5"]


def test_killed_worker_execution_resumes_from_checkpoint_without_rerunning_steps(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 1)
    first = serve()
    integration = counting_integration("resume", FIVE, wall_s=30)
    (execution_id,) = run_async(
        submit_all(
            SHARED_REDIS_URL,
            prefix,
            integration,
            [counting_input(prefix, sleep_first_run={"s3": 20})],
        )
    )
    wait_for(lambda: run_counts(shared_redis, prefix, ["s3"])["s3"] == 1, 15, "step s3 to start")
    wait_for(lambda: shared_redis.exists(keys.checkpoint(execution_id)), 5, "the checkpoint")

    first.signal(signal.SIGKILL)
    first.wait(5)
    second = serve(claim_idle_s=2)
    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=20))

    assert result.status == "succeeded", (result.error, result.failed_step)
    assert result.output["trail"] == FIVE
    assert [report.name for report in result.steps] == FIVE
    assert result.raw.worker == second.worker_id
    # s1 and s2 finished before the kill and were not run again; s3 was cut short and rerun.
    assert run_counts(shared_redis, prefix, FIVE) == {"s1": 1, "s2": 1, "s3": 2, "s4": 1, "s5": 1}
    assert "reclaimed entry" in second.log()
    assert shared_redis.xpending(keys.work(0), GROUP)["pending"] == 0


def test_sigterm_lets_an_in_flight_execution_finish_and_exits_0(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    daemon = serve(drain_s=10)
    integration = counting_integration("drain", ["slow", "after"])
    (execution_id,) = run_async(
        submit_all(
            SHARED_REDIS_URL,
            prefix,
            integration,
            [counting_input(prefix, sleep_first_run={"slow": 2})],
        )
    )
    wait_for(lambda: run_counts(shared_redis, prefix, ["slow"])["slow"] == 1, 15, "the slow step")

    stopped_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert time.monotonic() - stopped_at < 8  # it waited for the execution, not the whole drain

    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=1))
    assert result.status == "succeeded", (result.error, result.failed_step)
    assert result.raw.worker == daemon.worker_id
    assert run_counts(shared_redis, prefix, ["slow", "after"]) == {"slow": 1, "after": 1}
    assert "draining 1 in-flight execution(s)" in daemon.log()


def test_sigterm_gives_back_what_cannot_finish_and_another_worker_completes_it(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 1)
    first = serve(drain_s=1)
    integration = counting_integration("give-back", ["a", "b", "c"], wall_s=30)
    (execution_id,) = run_async(
        submit_all(
            SHARED_REDIS_URL,
            prefix,
            integration,
            [counting_input(prefix, sleep_first_run={"b": 20})],
        )
    )
    wait_for(lambda: run_counts(shared_redis, prefix, ["b"])["b"] == 1, 15, "step b to start")
    wait_for(lambda: shared_redis.exists(keys.checkpoint(execution_id)), 5, "the checkpoint")

    stopped_at = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    assert time.monotonic() - stopped_at < 8
    # Given back: a fresh entry nobody holds, not a pending one waiting for a reclaim.
    assert shared_redis.xpending(keys.work(0), GROUP)["pending"] == 0
    assert shared_redis.xlen(keys.work(0)) == 1

    # A long claim idle time: only the given-back entry, not a reclaim, can finish it in time.
    second = serve(claim_idle_s=60)
    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=15))
    assert result.status == "succeeded", (result.error, result.failed_step)
    assert result.raw.worker == second.worker_id
    assert result.output["trail"] == ["a", "b", "c"]
    assert run_counts(shared_redis, prefix, ["a", "b", "c"]) == {"a": 1, "b": 2, "c": 1}


SLOW_STEP = "import time\ndef run(input, ctx):\n    time.sleep(0.2)\n    return input + 1\n"


def test_worker_survives_losing_its_redis_connections(
    serve: ServeFactory, prefix: str, private_redis: RedisServer
) -> None:
    keys = Keys(prefix, 1)
    daemon = serve(redis_url=private_redis.url, claim_idle_s=2, concurrency=4)
    step = {"source": SLOW_STEP}
    integration = Integration.from_dict(
        {"name": "steady", "steps": [{"name": f"add{i}", **step} for i in range(3)]}
    )
    execution_ids = run_async(submit_all(private_redis.url, prefix, integration, list(range(16))))

    killer = private_redis.client()
    own_id = killer.client_id()
    killed = 0
    for _ in range(8):
        for client in killer.client_list():
            if int(client["id"]) != own_id:
                killed += int(killer.client_kill_filter(_id=client["id"]))
        time.sleep(0.3)
    assert killed >= 8

    results = run_async(wait_all(private_redis.url, prefix, execution_ids, timeout_s=30))
    assert [result.status for result in results] == ["succeeded"] * 16
    assert [result.output for result in results] == [n + 3 for n in range(16)]
    assert daemon.is_alive()
    assert "redis error" in daemon.log()
    assert killer.xlen(keys.dead(0)) == 0
    # And it still takes new work.
    (again,) = run_async(submit_all(private_redis.url, prefix, integration, [100]))
    (result,) = run_async(wait_all(private_redis.url, prefix, [again], timeout_s=10))
    assert result.output == 103


def test_fresh_worker_serves_every_partition_at_once(serve: ServeFactory, prefix: str) -> None:
    serve(partitions=3)
    integration = Integration.from_dict(
        {"name": "p", "steps": [{"name": "id", "source": "def run(i, c):\n    return i\n"}]}
    )

    async def run_on_each_partition() -> list[float]:
        took = []
        async with Client.connect(SHARED_REDIS_URL, prefix, 3) as client:
            for partition in (2, 1, 0):
                started = time.monotonic()
                execution_id = f"{partition}-{uuid.uuid4().hex}"
                await client.submit(integration, partition, execution_id=execution_id)
                result = await client.wait(execution_id, timeout=10)
                assert result.output == partition
                took.append(time.monotonic() - started)
        return took

    # Waiting on one idle stream must not keep the worker from the others.
    assert max(run_async(run_on_each_partition())) < 2


def test_loops_stop_on_sigterm_even_when_a_cancel_is_lost(prefix: str) -> None:
    """redis-py sends each command through asyncio.wait_for, which on Python < 3.12 drops a
    cancel that arrives as the write completes; under uvloop, as `runnerd serve` runs, a loop
    busy with Redis loses nearly every cancel. The worker's loops must stop all the same."""

    async def scenario() -> None:
        config = Settings(redis_url=SHARED_REDIS_URL, key_prefix=prefix, pool_size=0, http_port=0)
        worker = await Worker.start(config)
        verdict_given = False

        async def promote() -> None:
            if verdict_given:  # end the loop for good, whatever the verdict
                raise RuntimeError("the test is over")
            await worker._promote()

        busy = asyncio.create_task(worker._every(0, promote))
        try:
            await asyncio.sleep(0.2)
            worker.stopping.set()
            busy.cancel()
            done, _ = await asyncio.wait([busy], timeout=3)
            assert done, "the loop kept running after the worker was told to stop"
        finally:
            verdict_given = True
            await asyncio.gather(busy, return_exceptions=True)
            await worker.close()

    uvloop.run(scenario())


def _stop_in_process(config: Settings, before_stop: Any) -> Worker:
    """Start a worker in this process, run `before_stop(worker)` while it serves, stop it the
    way SIGTERM does, and return it (closed) once serve() has returned."""

    async def scenario() -> Worker:
        worker = await Worker.start(config)
        serving = asyncio.create_task(worker.serve(install_signals=False))
        try:
            await before_stop(worker)
            worker.stopping.set()
            await asyncio.wait_for(serving, 30)
        finally:
            if not serving.done():
                serving.cancel()
            await worker.close()
        return worker

    result: Worker = uvloop.run(scenario())
    return result


def test_entries_a_stopping_worker_holds_but_never_started_go_back(
    prefix: str, shared_redis: redis.Redis
) -> None:
    """An entry a read had delivered to this worker as it stopped (its reply lost with the
    cancelled read, so nothing here ever ran it) is handed back, and the worker leaves the
    group only once it holds nothing. Before, the consumer was deleted with its pending
    entries, and those executions were never run anywhere."""
    keys = Keys(prefix, 1)
    config = Settings(redis_url=SHARED_REDIS_URL, key_prefix=prefix, pool_size=0, http_port=0)
    stream = keys.work(0)

    async def take_one_behind_its_back(worker: Worker) -> None:
        shared_redis.xadd(stream, {ENTRY_FIELD: b"orphan"})
        shared_redis.xadd(stream, {b"no-body": b"x"})
        # Read as the worker's own consumer, the way its reader's last XREADGROUP did.
        shared_redis.xreadgroup(GROUP, worker.worker_id, {stream: ">"}, count=2)

    worker = _stop_in_process(config, take_one_behind_its_back)

    # The entry with a body is back as a fresh one; the one without is still held (a reclaim
    # dead-letters it), so the consumer stays in the group to hold it.
    entries = shared_redis.xrange(stream)
    assert [fields for _, fields in entries] == [{b"no-body": b"x"}, {ENTRY_FIELD: b"orphan"}]
    pending = shared_redis.xpending_range(stream, GROUP, min="-", max="+", count=10)
    assert [p["consumer"].decode() for p in pending] == [worker.worker_id]
    consumers = {c["name"].decode() for c in shared_redis.xinfo_consumers(stream, GROUP)}
    assert worker.worker_id in consumers

    # Once nothing is held, a stopping worker leaves the group.
    shared_redis.xack(stream, GROUP, pending[0]["message_id"])
    second = _stop_in_process(config, lambda worker: asyncio.sleep(0.1))
    consumers = {c["name"].decode() for c in shared_redis.xinfo_consumers(stream, GROUP)}
    assert second.worker_id not in consumers


def test_a_worker_stopped_during_a_burst_of_submits_loses_nothing(
    prefix: str, shared_redis: redis.Redis
) -> None:
    """SIGTERM while submits arrive: every execution either finished here or is back on the
    stream for the next worker; none is left pending under a consumer that is gone."""
    keys = Keys(prefix, 1)
    config = Settings(
        redis_url=SHARED_REDIS_URL, key_prefix=prefix, pool_size=1, http_port=0, concurrency=2
    )
    integration = Integration.from_dict(
        {"name": "burst", "steps": [{"name": "id", "source": "def run(i, c):\n    return i\n"}]}
    )
    submitted: list[str] = []

    async def submit_while_stopping(worker: Worker) -> None:
        async with Client.connect(SHARED_REDIS_URL, prefix, 1) as client:
            for round_number in range(40):
                submitted.append(await client.submit(integration, round_number))
                await asyncio.sleep(0.005)
                if round_number == 25:
                    worker.stopping.set()  # stop mid-burst; the submits go on

    for _ in range(3):
        _stop_in_process(config, submit_while_stopping)
        finished = sum(shared_redis.exists(keys.result(e)) for e in submitted)
        queued = shared_redis.xlen(keys.work(0))
        assert shared_redis.xpending(keys.work(0), GROUP)["pending"] == 0
        assert finished + queued == len(submitted), (finished, queued, len(submitted))
        assert queued > 0  # the stop came mid-burst: the test did exercise the hand-back
