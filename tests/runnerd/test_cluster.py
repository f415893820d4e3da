"""The same layout on a real 3-master Redis Cluster: partitions spread over the masters, two
workers, every result back."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runnerd.keys import Keys
from runnerd.messages import Integration
from tests.runnerd.conftest import (
    RedisServer,
    ServeFactory,
    run_async,
    start_redis_server,
    submit_all,
    wait_all,
    wait_for,
)

PARTITIONS = 6


@dataclass
class Cluster:
    masters: list[RedisServer]

    @property
    def url(self) -> str:
        return self.masters[0].url

    def master_of_slot(self) -> dict[int, int]:
        """slot -> port of the master serving it."""
        owners = {}
        for first, last, (_, port, *_), *_ in (
            self.masters[0].client().execute_command("CLUSTER SLOTS")
        ):
            owners.update(dict.fromkeys(range(first, last + 1), int(port)))
        return owners


def cluster_state_ok(server: RedisServer) -> bool:
    return bool(server.client().execute_command("CLUSTER INFO")["cluster_state"] == "ok")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    masters: list[RedisServer] = []
    try:
        for index in range(3):
            directory = tmp_path / f"node{index}"
            masters.append(
                start_redis_server(
                    directory,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(directory / "nodes.conf"),
                    "--cluster-node-timeout",
                    "5000",
                )
            )
        nodes = [f"127.0.0.1:{master.port}" for master in masters]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for master in masters:
            wait_for(lambda m=master: cluster_state_ok(m), 30, f"cluster_state:ok on {master.port}")
        yield Cluster(masters)
    finally:
        for master in masters:
            master.stop()


def spread_prefix(cluster: Cluster) -> tuple[str, set[int]]:
    """A key prefix whose partitions land on every master (most random prefixes do; this makes
    the test independent of luck), and the ports of the masters they land on."""
    owners = cluster.master_of_slot()
    client = cluster.masters[0].client()
    for _ in range(100):
        prefix = f"c{uuid.uuid4().hex[:12]}"
        keys = Keys(prefix, PARTITIONS)
        ports = {
            owners[int(client.execute_command("CLUSTER KEYSLOT", keys.work(p)))]
            for p in range(PARTITIONS)
        }
        if len(ports) == len(cluster.masters):
            return prefix, ports
    pytest.fail("no prefix spreads over every master")


def test_two_workers_on_a_three_master_cluster(cluster: Cluster, serve: ServeFactory) -> None:
    prefix, expected_ports = spread_prefix(cluster)
    settings = {"key_prefix": prefix, "partitions": PARTITIONS, "concurrency": 4}
    workers = [serve(redis_url=cluster.url, **settings) for _ in range(2)]
    integration = Integration.from_dict(
        {
            "name": "clustered",
            "steps": [
                {"name": "double", "source": "def run(n, ctx):\n    return n * 2\n"},
                {
                    "name": "plus-one",
                    "runtime": "node",
                    "source": "export function run(n) { return n + 1; }",
                },
            ],
        }
    )

    inputs = list(range(60))
    execution_ids = run_async(
        submit_all(cluster.url, prefix, integration, inputs, partitions=PARTITIONS)
    )
    results = run_async(
        wait_all(cluster.url, prefix, execution_ids, timeout_s=60, partitions=PARTITIONS)
    )

    assert [result.status for result in results] == ["succeeded"] * 60
    assert [result.output for result in results] == [n * 2 + 1 for n in inputs]
    assert {int(execution_id.split("-")[0]) for execution_id in execution_ids} == set(
        range(PARTITIONS)
    )
    assert all(worker.is_alive() for worker in workers)
    assert {result.raw.worker for result in results} == {worker.worker_id for worker in workers}
    # Ask each master which work streams it holds: they are spread, not on one hot slot.
    holders = set()
    for master in cluster.masters:
        streams = [key for key in master.client().scan_iter(match="*:work") if prefix in str(key)]
        if streams:
            holders.add(master.port)
    assert holders == expected_ports
    assert len(holders) > 1
    for master in cluster.masters:
        assert list(master.client().scan_iter(match="*:input:*")) == []
