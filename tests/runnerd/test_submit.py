"""Submit is idempotent and sends an integration once, against a real Redis and worker: the same
execution id twice (a retried submit whose reply was lost) is enqueued once and runs once; an
integration goes over the wire once per client and digest, and is sent again only when Redis
lost it."""

from __future__ import annotations

import redis

from runnerd.client import Client
from runnerd.keys import Keys
from runnerd.messages import Integration
from tests.runnerd.conftest import SHARED_REDIS_URL, ServeFactory, run_async

INTEGRATION = Integration.from_dict(
    {"name": "echo", "steps": [{"name": "id", "source": "def run(i, c):\n    return i\n"}]}
)


def test_the_same_execution_id_twice_is_enqueued_once(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 1)
    execution_id = keys.new_execution_id(0)

    async def submit_twice() -> tuple[str, str]:
        async with Client.connect(SHARED_REDIS_URL, prefix) as client:
            first = await client.submit(INTEGRATION, {"n": 1}, execution_id=execution_id)
            second = await client.submit(INTEGRATION, {"n": 2}, execution_id=execution_id)
        return first, second

    assert run_async(submit_twice()) == (execution_id, execution_id)
    assert shared_redis.xlen(keys.work(0)) == 1  # one entry: the second submit was a no-op
    serve()

    async def wait() -> object:
        async with Client.connect(SHARED_REDIS_URL, prefix) as client:
            return (await client.wait(execution_id, timeout=30)).output

    assert run_async(wait()) == {"n": 1}  # the first submit's input, run once


def test_an_integration_is_sent_once_and_again_when_redis_lost_it(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 1)
    serve()

    async def submit_and_wait() -> list[object]:
        async with Client.connect(SHARED_REDIS_URL, prefix) as client:
            outputs = [(await client.run(INTEGRATION, "one", timeout=30)).output]
            ((_, digest),) = client._stored  # (partition, digest)
            key = keys.integration(0, digest)
            stored = shared_redis.get(key)
            shared_redis.delete(key)  # evicted, or a FLUSHDB
            outputs.append((await client.run(INTEGRATION, "two", timeout=30)).output)
            assert shared_redis.get(key) == stored  # sent again when Redis said it had none
            shared_redis.pexpire(key, 1000)
            outputs.append((await client.run(INTEGRATION, "three", timeout=30)).output)
            assert shared_redis.pttl(key) > 1000  # not sent, its TTL refreshed
            return outputs

    assert run_async(submit_and_wait()) == ["one", "two", "three"]
