"""The client at platform scale, against real Redis servers and clusters: 10,000 executions
awaited at once on a handful of connections, waits that outlive a failover and a killed
master, a submit whose reply was lost enqueued exactly once.

Where the subject is the client alone, a small completer in the test plays the worker: it
reads the work stream and completes each execution through the worker's own Store (the same
Lua script a worker runs), so 10,000 executions take seconds, not a sandbox per step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from runnerd import client as client_module
from runnerd.client import Client, open_redis
from runnerd.completions import READ_BLOCK_MS
from runnerd.keys import GROUP, Keys
from runnerd.messages import ExecutionResult, Integration, encoder, execution_decoder
from runnerd.store import Store
from tests.runnerd.clusters import Cluster, running_cluster, spread_prefix
from tests.runnerd.clusters import cluster as cluster  # the 3-master cluster fixture
from tests.runnerd.conftest import RedisServer, ServeFactory, run_async, wait_for

MANY = 10_000
CONNECTIONS_MAX = 8
ECHO = Integration.from_dict(
    {"name": "echo", "steps": [{"name": "id", "source": "def run(i, c):\n    return i\n"}]}
)


async def complete_everything(url: str, keys: Keys, stop: asyncio.Event) -> int:
    """Play the worker: complete every execution on the work streams with its input as output."""
    store = Store(await open_redis(url), keys, result_ttl_s=300)
    completed = 0
    try:
        await store.ensure_groups("completer")
        while not stop.is_set():
            for partition in range(keys.partitions):
                entries = await store.read_new(partition, "completer", 500, 20)
                for entry in entries:
                    execution = execution_decoder.decode(entry.body or b"")
                    payload = await store.input(execution.execution_id)
                    assert payload is not None
                    result = ExecutionResult(
                        execution.execution_id, "succeeded", msgspec.Raw(payload)
                    )
                    await store.complete(entry, result)
                    completed += 1
    finally:
        await store.redis.aclose()
    return completed


class ConnectionCounter:
    """Samples CLIENT LIST on every node while the test runs: the most connections named
    `name` open at once, over all nodes together."""

    def __init__(self, ports: list[int], name: str) -> None:
        self.clients = [redis.Redis(port=port) for port in ports]
        self.name = name
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ConnectionCounter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = 0
            for client in self.clients:
                with contextlib.suppress(redis.RedisError):
                    now += sum(1 for c in client.client_list() if c.get("name") == self.name)
            self.most = max(self.most, now)
            self.samples += 1
            time.sleep(0.02)


async def submit_and_wait_many(url: str, keys: Keys, name: str) -> list[Any]:
    stop = asyncio.Event()
    completer = asyncio.create_task(complete_everything(url, keys, stop))
    try:
        async with Client.connect(url, keys.prefix, keys.partitions, name=name) as client:

            async def one(n: int) -> Any:
                execution_id = await client.submit(ECHO, n)
                return (await client.wait(execution_id, timeout=120)).output

            return await asyncio.gather(*(one(n) for n in range(MANY)))
    finally:
        stop.set()
        await completer


def test_ten_thousand_waits_at_once_on_one_redis(private_redis: RedisServer) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}", 1)
    name = f"scale-{uuid.uuid4().hex[:6]}"
    with ConnectionCounter([private_redis.port], name) as counter:
        outputs = run_async(submit_and_wait_many(private_redis.url, keys, name))
    assert outputs == list(range(MANY))
    assert counter.samples > 10  # it did look while the waits were in flight
    assert 1 <= counter.most <= CONNECTIONS_MAX, counter.most
    assert private_redis.client().xpending(keys.work(0), GROUP)["pending"] == 0


def test_ten_thousand_waits_at_once_on_a_three_master_cluster(cluster: Cluster) -> None:
    keys = Keys(spread_prefix(cluster, 3), 3)
    name = f"scale-{uuid.uuid4().hex[:6]}"
    with ConnectionCounter([node.port for node in cluster.nodes], name) as counter:
        outputs = run_async(submit_and_wait_many(cluster.url, keys, name))
    assert outputs == list(range(MANY))
    assert counter.samples > 10
    # One reader per partition and the batcher's one per master: 6 here.
    assert 3 <= counter.most <= CONNECTIONS_MAX, counter.most


def test_wait_on_a_finished_execution_returns_at_once(private_redis: RedisServer) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}", 1)

    async def scenario() -> Any:
        stop = asyncio.Event()
        completer = asyncio.create_task(complete_everything(private_redis.url, keys, stop))
        async with Client.connect(private_redis.url, keys.prefix) as client:
            execution_id = await client.submit(ECHO, "early")
            await client.wait(execution_id, timeout=30)
        stop.set()
        await completer
        # A fresh client, whose reader starts after the announcement: the key answers.
        async with Client.connect(private_redis.url, keys.prefix) as late:
            return (await late.wait(execution_id, timeout=0.5)).output

    assert run_async(scenario()) == "early"


def test_a_reader_idle_past_its_block_is_not_a_failure(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An XREAD that blocks and sees nothing answers nil; the reader must take that for no
    news, not for a server that hangs (which it once logged, reconnecting every block)."""
    keys = Keys(f"t{uuid.uuid4().hex[:10]}", 1)

    async def scenario() -> Any:
        stop = asyncio.Event()
        async with Client.connect(private_redis.url, keys.prefix) as client:
            await asyncio.sleep(READ_BLOCK_MS / 1000 * 2.5)  # two empty blocks, and a half
            completer = asyncio.create_task(complete_everything(private_redis.url, keys, stop))
            execution_id = await client.submit(ECHO, "after the quiet")
            output = (await client.wait(execution_id, timeout=30)).output
        stop.set()
        await completer
        return output

    with caplog.at_level(logging.WARNING, logger="runnerd"):
        assert run_async(scenario()) == "after the quiet"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class ReplyDropper:
    """A TCP proxy in front of Redis that forwards everything, except that the first reply to
    a connection that sent the submit script is dropped and the connection cut: Redis ran the
    submit, the client never heard."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        saw_submit = asyncio.Event()

        async def upward() -> None:
            while data := await reader.read(65536):
                if b"EVALSHA" in data and self.dropped == 0:
                    saw_submit.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downward() -> None:
            while data := await up_reader.read(65536):
                if saw_submit.is_set() and self.dropped == 0:
                    self.dropped += 1
                    return  # the reply never reaches the client
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(upward()), asyncio.create_task(downward())]
        with contextlib.suppress(ConnectionError):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for closing in (writer, up_writer):
            closing.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_a_submit_whose_reply_was_lost_is_enqueued_exactly_once(
    private_redis: RedisServer,
) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}", 1)

    async def scenario() -> tuple[str, int]:
        proxy = ReplyDropper(private_redis.port)
        port = await proxy.start()
        try:
            async with Client.connect(f"redis://127.0.0.1:{port}/0", keys.prefix) as client:
                execution_id = await client.submit(ECHO, "once")
        finally:
            await proxy.close()
        return execution_id, proxy.dropped

    execution_id, dropped = run_async(scenario())
    assert dropped == 1  # the fault did happen
    server = private_redis.client()
    entries = server.xrange(keys.work(0))
    assert len(entries) == 1  # sent twice, enqueued once
    assert execution_decoder.decode(entries[0][1][b"e"]).execution_id == execution_id


def test_every_execution_succeeds_through_a_failover_and_a_killed_master(
    tmp_path: Path, serve: ServeFactory
) -> None:
    """3 masters with a replica each, two real workers; while 600 executions are awaited at
    once, one master's replica takes over (CLUSTER FAILOVER) and the old master is then
    killed. Every execution succeeds; the client never surfaces an error."""
    with running_cluster(tmp_path / "cluster", replicas=1) as cluster:
        partitions = 3
        keys = Keys(spread_prefix(cluster, partitions), partitions)
        settings = {"key_prefix": keys.prefix, "partitions": partitions, "concurrency": 4}
        workers = [serve(redis_url=cluster.url, claim_idle_s=3, **settings) for _ in range(2)]
        victim_port = cluster.master_of_slot()[cluster.slot_of(keys.work(0))]
        replica = cluster.replica_of(victim_port)
        victim = cluster.node(victim_port)
        count = 600

        async def scenario() -> list[Any]:
            async with Client.connect(cluster.url, keys.prefix, partitions) as client:

                async def one(n: int) -> Any:
                    execution_id = await client.submit(ECHO, n)
                    result = await client.wait(execution_id, timeout=180)
                    assert result.ok, (result.status, result.error)
                    return result.output

                waits = asyncio.gather(*(one(n) for n in range(count)))
                await asyncio.sleep(1.0)
                replica.client().execute_command("CLUSTER", "FAILOVER")
                await asyncio.to_thread(
                    wait_for,
                    lambda: replica.client().info("replication")["role"] == "master",
                    30,
                    "the replica to take over",
                )
                await asyncio.sleep(1.0)
                assert victim.process is not None
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait(10)
                return await waits

        outputs = run_async(scenario())
        assert outputs == list(range(count))
        assert all(worker.is_alive() for worker in workers)


async def announced_while_waiting(url: str, keys: Keys) -> list[Any]:
    """Waits registered first, completions after: with every wait's timeout far below its
    first recheck of the result key, only the completions reader can end them."""
    store = Store(await open_redis(url), keys, result_ttl_s=60)
    try:
        await store.ensure_groups("completer")
        async with Client.connect(url, keys.prefix, keys.partitions) as client:
            ids = [await client.submit(ECHO, n) for n in range(2 * keys.partitions)]
            waits = [asyncio.create_task(client.wait(i, timeout=5)) for i in ids]
            await asyncio.sleep(0.3)  # every wait has read its key and found nothing
            assert not any(wait.done() for wait in waits)
            for partition in range(keys.partitions):
                for entry in await store.read_new(partition, "completer", 100, None):
                    execution = execution_decoder.decode(entry.body or b"")
                    payload = await store.input(execution.execution_id)
                    assert payload is not None
                    output = msgspec.Raw(payload)
                    await store.complete(
                        entry, ExecutionResult(execution.execution_id, "succeeded", output)
                    )
            return [result.output for result in await asyncio.gather(*waits)]
    finally:
        await store.redis.aclose()


def test_waits_are_ended_by_their_announcements(private_redis: RedisServer) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}", 2)
    assert client_module.RECHECK_FIRST_S > 5
    assert run_async(announced_while_waiting(private_redis.url, keys)) == [0, 1, 2, 3]


def test_waits_are_ended_by_their_announcements_on_a_cluster(cluster: Cluster) -> None:
    keys = Keys(spread_prefix(cluster, 3), 3)
    assert run_async(announced_while_waiting(cluster.url, keys)) == list(range(6))


def test_a_wait_whose_announcement_was_lost_ends_on_its_recheck(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result written with no announcement (trimmed while the client was cut off): the wait
    reads the key again when its recheck is due, and ends."""
    monkeypatch.setattr(client_module, "RECHECK_FIRST_S", 0.5)
    monkeypatch.setattr(client_module, "RECHECK_TICK_S", 0.1)
    keys = Keys(f"t{uuid.uuid4().hex[:10]}", 1)

    async def scenario() -> Any:
        async with Client.connect(private_redis.url, keys.prefix) as client:
            execution_id = await client.submit(ECHO, "quiet")
            waiting = asyncio.create_task(client.wait(execution_id, timeout=10))
            await asyncio.sleep(0.2)
            result = ExecutionResult(execution_id, "succeeded", msgspec.Raw(b"\xa5quiet"))
            await client.redis.set(keys.result(execution_id), encoder.encode(result))
            return (await waiting).output, await client.redis.xlen(keys.completions(0))

    assert run_async(scenario()) == ("quiet", 0)  # found by the recheck, nothing announced
