"""The same layout on a real 3-master Redis Cluster: partitions spread over the masters, two
workers, every result back."""

from __future__ import annotations

from runnerd.messages import Integration
from tests.runnerd.clusters import Cluster, spread_prefix
from tests.runnerd.clusters import cluster as cluster  # the 3-master cluster fixture
from tests.runnerd.conftest import (
    ServeFactory,
    run_async,
    submit_all,
    wait_all,
)

PARTITIONS = 6


def test_two_workers_on_a_three_master_cluster(cluster: Cluster, serve: ServeFactory) -> None:
    prefix = spread_prefix(cluster, PARTITIONS)
    expected_ports = {node.port for node in cluster.nodes}
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
    for master in cluster.nodes:
        streams = [key for key in master.client().scan_iter(match="*:work") if prefix in str(key)]
        if streams:
            holders.add(master.port)
    assert holders == expected_ports
    assert len(holders) > 1
    for master in cluster.nodes:
        assert list(master.client().scan_iter(match="*:input:*")) == []
