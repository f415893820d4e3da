"""Completion races, against a real Redis: two workers finishing one execution (after a reclaim,
or after a give-back left a second entry for it) leave one result, one wake-up, nothing
pending and nothing on the stream."""

from __future__ import annotations

import asyncio

import msgspec

from runnerd.client import Client, open_redis
from runnerd.keys import Keys
from runnerd.messages import ExecutionResult, Integration, completion_decoder, result_decoder
from runnerd.store import COMPLETION_FIELD, ENTRY_FIELD, Entry, Store
from tests.runnerd.conftest import SHARED_REDIS_URL, run_async

INTEGRATION = Integration.from_dict(
    {"name": "race", "steps": [{"name": "id", "source": "def run(i, c):\n    return i\n"}]}
)


def finished_by(execution_id: str, worker: str) -> ExecutionResult:
    output = msgspec.Raw(msgspec.msgpack.encode(f"from {worker}"))
    return ExecutionResult(execution_id, "succeeded", output=output, worker=worker)


async def race(prefix: str, duplicate_entry: bool) -> None:
    keys = Keys(prefix, 1)
    async with Client.connect(SHARED_REDIS_URL, prefix) as client:
        execution_id = await client.submit(INTEGRATION, {"n": 1})
        # Each worker on its own connection, as two processes would be.
        first = Store(await open_redis(SHARED_REDIS_URL), keys, result_ttl_s=60)
        second = Store(await open_redis(SHARED_REDIS_URL), keys, result_ttl_s=60)
        try:
            await first.ensure_groups("worker-a")
            (taken,) = await first.read_new(0, "worker-a", 1, None)
            if duplicate_entry:
                # A give-back put the execution on the stream again while A still ran it.
                (_, fields), *_ = await client.redis.xrange(keys.work(0))
                await client.redis.xadd(keys.work(0), {ENTRY_FIELD: fields[ENTRY_FIELD]})
                (other,) = await second.read_new(0, "worker-b", 1, None)
            else:
                # B took the entry over as if A had gone silent.
                (other,) = await second.reclaim(0, "worker-b", 0, 10)
                assert other.entry_id == taken.entry_id and other.deliveries == 2
            assert isinstance(taken, Entry) and isinstance(other, Entry)

            written = await asyncio.gather(
                first.complete(taken, finished_by(execution_id, "a")),
                second.complete(other, finished_by(execution_id, "b")),
            )

            assert sorted(written) == [False, True]
            winner = "a" if written[0] else "b"
            raw = await client.redis.get(keys.result(execution_id))
            assert result_decoder.decode(raw).worker == winner
            # Announced once, by the winner, with its whole (small) result.
            ((_, announced),) = await client.redis.xrange(keys.completions(0))
            completion = completion_decoder.decode(announced[COMPLETION_FIELD])
            assert completion.execution_id == execution_id and completion.status == "succeeded"
            assert result_decoder.decode(completion.result).worker == winner
            pending = await client.redis.xpending(keys.work(0), "runnerd")
            assert pending["pending"] == 0  # the loser's entry is acked too
            assert await client.redis.xlen(keys.work(0)) == 0
            assert await client.redis.exists(keys.input(execution_id)) == 0
            result = await client.wait(execution_id, timeout=1)
            assert result.output == f"from {winner}"
        finally:
            await first.redis.aclose()
            await second.redis.aclose()


def test_two_workers_completing_a_reclaimed_entry_leave_one_result(prefix: str) -> None:
    run_async(race(prefix, duplicate_entry=False))


def test_two_workers_completing_duplicate_entries_leave_one_result(prefix: str) -> None:
    run_async(race(prefix, duplicate_entry=True))


def test_dead_consumers_are_forgotten_but_not_those_holding_entries(prefix: str) -> None:
    async def scenario() -> list[str]:
        keys = Keys(prefix, 1)
        async with Client.connect(SHARED_REDIS_URL, prefix) as client:
            await client.submit(INTEGRATION, {"n": 1})
        store = Store(await open_redis(SHARED_REDIS_URL), keys, result_ttl_s=60)
        try:
            await store.ensure_groups("ghost")  # a worker that died holding nothing
            await store.ensure_groups("holder")
            (entry,) = await store.read_new(0, "holder", 1, None)  # dies holding an entry
            await asyncio.sleep(0.05)
            assert await store.forget_dead_consumers(0, idle_min_ms=10) == 1
            consumers = await store.redis.xinfo_consumers(keys.work(0), "runnerd")
            return [c["name"].decode() for c in consumers]
        finally:
            await store.redis.aclose()

    assert run_async(scenario()) == ["holder"]  # its entry waits to be reclaimed
