"""The compare scenario runs every system (runnerd and each peer variant, in the peers' own
venvs) end to end with tiny sizes on the shared Redis: sane figures for each (never speed),
the versions measured, a chart, and nothing left behind, neither keys nor processes.

The peers' venvs are made on first use in the harness's cache (bench/peers.py) and reused."""

from __future__ import annotations

import json
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
import redis

from bench import cli, compare, peers

REDIS_URL = "redis://127.0.0.1:6379/0"
TINY = ["--redis-url", REDIS_URL, "--repeat", "1", "--steps", "6", "--warmup", "2"]
TINY += ["--chain-steps", "2"]
TINY += ["--clients", "2", "--max-seconds", "4", "--peer-processes", "1"]
WORKERS = ["--concurrency", "2", "--pool-size", "1", "--uid-base", "644000"]


def _queue_keys() -> set[bytes]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return {key for key in client.scan_iter(match="*bench-*", count=1000)}
    finally:
        client.close()


def _peer_processes() -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(peers.APPS) in cmdline or "celery_side" in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.timeout(600)  # the first run makes three venvs
def test_every_system_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _queue_keys()
    out, png = tmp_path / "out.json", tmp_path / "compare.png"

    argv = ["compare", *TINY, *WORKERS, "--json", str(out), "--png", str(png), "--markdown"]
    assert cli.main(argv) == 0

    data = json.loads(out.read_text())
    systems = {s["name"]: s for s in data["systems"]}
    assert list(systems) == compare.SYSTEMS
    for name, system in systems.items():
        (repetition,) = system["repetitions"]
        assert repetition["per_s"] > 0, name
        assert repetition["throughput"]["n"] >= 1, name
        assert 1 <= repetition["chain"]["n"] <= 2, name
        assert 0 < repetition["chain"]["p50"] <= repetition["chain"]["max"], name
        if name != "runnerd":
            package = peers.PACKAGES[peers.PEERS[name].system][0]
            library, version = package.split("[")[0].split("==")[0], package.split("==")[1]
            assert system["versions"][library] == version, "the versions measured are recorded"
    assert systems["runnerd"]["isolation"] == "every step sandboxed"
    assert [line.split(":")[0] for line in data["targets"]] == [
        "- runnerd executions/s >= 3x rq",
        "- runnerd executions/s >= 3x celery-fresh",
    ]
    report = capsys.readouterr().out
    assert "| system | fresh process per task |" in report
    assert "Versions measured:" in report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _peer_processes() == [], "every peer worker and driver is stopped"
    # Per-job keys of the peers carry a short TTL; queue keys are deleted at once.
    queues = [f"bench-{name}-".encode() for name in peers.PEERS]
    assert not [k for k in _queue_keys() - before if any(q in k for q in queues)]


def test_unknown_system_is_one_clear_error() -> None:
    with pytest.raises(SystemExit, match="--systems: unknown nope; choose from runnerd, rq"):
        cli.main(["compare", "--systems", "runnerd,nope"])


def test_each_system_is_measured_once() -> None:
    assert compare.parse_systems("rq, runnerd,rq") == ["rq", "runnerd"]
