"""The open-loop scenario runs end to end with tiny rates against a real worker and the shared
Redis and reports a sane row per offered rate (never speed), as JSON and as a chart."""

from __future__ import annotations

import json
from pathlib import Path

from bench import cli


def test_reports_each_offered_rate(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    argv = ["open-loop", "--repeat", "1", "--warmup", "2", "--rates", "10,20"]
    argv += ["--duration-s", "0.5", "--stop-p99-ms", "100000"]
    argv += ["--concurrency", "2", "--pool-size", "1", "--uid-base", "642000"]

    png = tmp_path / "latency.png"
    assert cli.main([*argv, "--json", str(out), "--png", str(png)]) == 0

    data = json.loads(out.read_text())
    assert data["layers"], "every step reports its confinement layers"
    levels = data["levels"]
    assert [level["rate_per_s"] for level in levels][:1] == [10.0]
    for level in levels:
        (served,) = level["served_per_s"]
        assert served > 0
        assert 0 < level["latency"]["p50"] <= level["latency"]["max"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "a PNG chart of latency vs rate"
