"""The waits scenario runs end to end on a small count against a private Redis and its
completer process, and reports sane figures (never judged for speed here)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import cli


def test_reports_cpu_connections_and_rate(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    argv = ["waits", "--executions", "500", "--repeat", "2", "--warmup", "50"]

    code = cli.main([*argv, "--json", str(out)])

    assert code in (0, 1)  # 1: a target missed, which a loaded machine may do
    runs = json.loads(out.read_text())["repetitions"]
    assert len(runs) == 2
    for run in runs:
        assert run["executions"] == 500
        assert 0 < run["cpu_ms_per_execution"] < 50
        assert 1 <= run["connections_max"] <= 8
        assert run["per_s"] > 0
