"""The throughput and scale scenarios run end to end with tiny sizes against real workers and
the shared Redis, report sane figures (never speed) and leave no keys behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from bench import cli

TINY = ["--steps", "8", "--warmup", "2", "--clients", "2"]
WORKERS = ["--concurrency", "2", "--pool-size", "1", "--uid-base", "640000"]


def _leftover_keys() -> list[bytes]:
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        return list(client.scan_iter(match="{bench-*", count=1000))
    finally:
        client.close()


# scale's own default is 1,2; its test starts only the 2-worker fleet that throughput's lacks.
@pytest.mark.parametrize(
    ("scenario", "extra", "counts"),
    [("throughput", ["--repeat", "2"], [1]), ("scale", ["--repeat", "1", "--workers", "2"], [2])],
)
def test_reports_every_fleet(
    scenario: str,
    extra: list[str],
    counts: list[int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = set(_leftover_keys())
    out = tmp_path / "out.json"

    assert cli.main([scenario, *TINY, *extra, *WORKERS, "--json", str(out), "--markdown"]) == 0

    data = json.loads(out.read_text())
    assert [fleet["workers"] for fleet in data["fleets"]] == counts
    for fleet in data["fleets"]:
        assert len(fleet["repetitions"]) == (2 if scenario == "throughput" else 1)
        assert fleet["layers"], "every step reports its confinement layers"
        assert all(m["worker_mib"] > 0 for m in fleet["memory_warm"])
        for repetition in fleet["repetitions"]:
            assert repetition["per_s"] > 0
            assert repetition["latency"]["n"] == 8
            assert 0 < repetition["latency"]["p50"] <= repetition["latency"]["max"]
    assert [t.startswith("- 1 worker") for t in data["targets"]] == ([True] if 1 in counts else [])
    assert "| workers | executions/s |" in capsys.readouterr().out
    # A worker killed at the stop deadline may have had a completion in flight that Redis runs
    # after the clean-up: such a result can remain, but it expires; nothing else may.
    leftover = set(_leftover_keys()) - before
    assert all(b":result:" in key for key in leftover), "the run deletes its keys"
