"""Real Redis Clusters for tests: 3 masters, optionally a replica each, on free ports, nothing
kept on disk; every node is stopped by the fixture that started it."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runnerd.keys import Keys
from tests.runnerd.conftest import RedisServer, start_redis_server, wait_for

NODE_TIMEOUT_MS = 2000  # how soon a dead master is noticed (and a replica promoted)


@dataclass
class Cluster:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def master_of_slot(self) -> dict[int, int]:
        """slot -> port of the master serving it, as a live node sees it."""
        owners = {}
        for first, last, (_, port, *_), *_ in (
            self.live()[0].client().execute_command("CLUSTER SLOTS")
        ):
            owners.update(dict.fromkeys(range(first, last + 1), int(port)))
        return owners

    def slot_of(self, key: str) -> int:
        return int(self.live()[0].client().execute_command("CLUSTER KEYSLOT", key))

    def replica_of(self, master_port: int) -> RedisServer:
        for node in self.live():
            info = node.client().info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master_port:
                return node
        pytest.fail(f"no replica of {master_port}")

    def state_ok(self) -> bool:
        with contextlib.suppress(Exception):
            return all(
                n.client().execute_command("CLUSTER INFO")["cluster_state"] == "ok"
                for n in self.live()
            )
        return False


def start_cluster(directory: Path, replicas: int = 0) -> Cluster:
    nodes: list[RedisServer] = []
    try:
        for index in range(3 * (1 + replicas)):
            node_dir = directory / f"node{index}"
            nodes.append(
                start_redis_server(
                    node_dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                )
            )
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"]
            + ["--cluster-replicas", str(replicas)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        cluster = Cluster(nodes)
        wait_for(cluster.state_ok, 30, "cluster_state:ok on every node")
        if replicas:
            wait_for(lambda: _replicas_synced(cluster), 30, "every replica in sync")
        return cluster
    except BaseException:
        for node in nodes:
            node.stop()
        raise


def _replicas_synced(cluster: Cluster) -> bool:
    for node in cluster.nodes:
        info = node.client().info("replication")
        if info.get("role") == "slave" and info.get("master_link_status") != "up":
            return False
    return True


@contextlib.contextmanager
def running_cluster(directory: Path, replicas: int = 0) -> Iterator[Cluster]:
    cluster = start_cluster(directory, replicas)
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A 3-master cluster of this test's own."""
    with running_cluster(tmp_path / "cluster") as started:
        yield started


def spread_prefix(cluster: Cluster, partitions: int) -> str:
    """A key prefix whose partitions land on every master, so the test does not depend on
    luck (most random prefixes do)."""
    owners = cluster.master_of_slot()
    masters = set(owners.values())
    for _ in range(200):
        prefix = f"c{uuid.uuid4().hex[:12]}"
        keys = Keys(prefix, partitions)
        ports = {owners[cluster.slot_of(keys.work(p))] for p in range(partitions)}
        if ports == masters:
            return prefix
    pytest.fail("no prefix spreads over every master")
