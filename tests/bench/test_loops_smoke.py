"""The loops scenario runs end to end on a few items through real workers, checks every
item's result, and reports each case and the distributed loop's samples (never judged for
speed here)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import cli

WORKERS = ["--concurrency", "2", "--pool-size", "1", "--uid-base", "646000"]


def test_reports_every_case_and_the_distributed_loops_samples(tmp_path: Path) -> None:
    out, png = tmp_path / "out.json", tmp_path / "loops.png"
    argv = ["loops", "--items", "12", "--repeat", "1", "--warmup", "2"]
    argv += ["--distributed-items", "40", "--sample-s", "0.2", *WORKERS]

    code = cli.main([*argv, "--json", str(out), "--png", str(png)])

    assert code in (0, 1)  # 1: a target missed, which a loaded machine may do
    outcome = json.loads(out.read_text())["outcome"]
    assert outcome["items"] == 12
    assert set(outcome["seconds"]) == {"loop", "loop-default", "executions", "loop-p1"}
    assert all(len(found) == 1 and found[0] > 0 for found in outcome["seconds"].values())
    distributed = outcome["distributed"]
    assert distributed["items"] == 40 and distributed["took_s"] > 0
    done = [sample["done"] for sample in distributed["samples"]]
    assert done[0] == 0 and done[-1] == 40 and done == sorted(done)
    assert png.stat().st_size > 10_000
