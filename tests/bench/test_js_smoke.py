"""The js scenario runs end to end with tiny sizes against two real workers (JavaScript forked
from the node zygote, and exec'd per step) and the shared Redis: each worker on the path it was
given, sane figures (never speed), a soak that reads the node zygote's memory, no keys left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import redis

from bench import cli

TINY = ["--repeat", "1", "--steps", "4", "--warmup", "1", "--exec-steps", "2", "--clients", "2"]
TINY += ["--chain-steps", "2", "--exec-chain-steps", "1", "--chain-warmup", "0"]
TINY += ["--node-starts", "2"]
WORKERS = ["--concurrency", "2", "--pool-size", "1", "--uid-base", "645000"]

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs node")


def _leftover_keys() -> set[bytes]:
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        return set(client.scan_iter(match="{bench-*", count=1000))
    finally:
        client.close()


def _run(argv: list[str], tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "out.json"
    assert cli.main(["js", *argv, *WORKERS, "--json", str(out), "--markdown"]) == 0
    data: dict[str, object] = json.loads(out.read_text())
    return data


def test_both_paths_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _leftover_keys()

    data = _run(TINY, tmp_path)

    assert data["paths"] == ["fork", "exec"]
    pids = data["node_zygote_pids"]
    assert isinstance(pids, dict)
    assert pids["fork"] and pids["exec"] is None, "a node zygote in the forked worker only"
    (repetition,) = data["repetitions"]  # type: ignore[misc]
    counts = {"fork-node": 4, "fork-python": 4, "exec-node": 2, "exec-python": 4}
    for key, count in counts.items():
        measured = repetition["throughput"][key]
        assert measured["per_s"] > 0 and measured["latency"]["n"] == count, key
        assert measured["layers"], "every step reports its confinement layers"
        assert set(measured["cpu_ms"]) == {"worker", "zygote", "node zygote", "steps"}
    for path, count in (("fork", 2), ("exec", 1)):
        chain = repetition["chains"][path]
        assert chain["latency"]["n"] == count
        assert 0 < chain["latency"]["p50"] <= chain["latency"]["max"]
    assert repetition["node_cpu_ms"] > 0 and repetition["node_wall_ms"] > 0
    assert [line.split(":")[0] for line in data["targets"]] == [  # type: ignore[union-attr]
        "- forked JavaScript",
        "- forked JavaScript executions/s >= 0.7x Python's, same worker",
        "- forked 6-step JavaScript chain p50 <= 40 ms",
    ]
    printed = capsys.readouterr().out
    assert "| JS path | steps |" in printed and "| 6 JS steps, JS path |" in printed
    # A result completed as a worker was killed at the stop deadline may remain; it expires.
    assert all(b":result:" in key for key in _leftover_keys() - before), "keys are deleted"


def test_soak_reads_the_node_zygote(tmp_path: Path) -> None:
    argv = ["--soak", "6", "--soak-samples", "3", "--warmup", "1", "--clients", "2"]

    data = _run(argv, tmp_path)

    assert data["paths"] == ["fork"] and data["repetitions"] == []
    samples = data["soak"]
    assert isinstance(samples, list)
    assert [s["executions"] for s in samples] == [0, 2, 4, 6]
    for sample in samples:
        memory = sample["memory"]
        assert memory["worker_mib"] > 0 and memory["zygote_mib"] > 0
        assert memory["node_zygote_mib"] > 0, "the node zygote is found under the zygote"
    assert len(data["targets"]) == 2  # type: ignore[arg-type]
