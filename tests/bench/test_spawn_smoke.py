"""The spawn scenario runs end to end with tiny sizes and reports sane figures (never speed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import cli


def test_spawn_scenario_reports_every_variant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "spawn.json"
    argv = ["spawn", "--repeat", "1", "--steps", "3", "--warmup", "1", "--prime", "2"]
    code = cli.main([*argv, "--settle-s", "0", "--json", str(out), "--markdown"])

    assert code == 0
    data = json.loads(out.read_text())
    expected = {"py-fresh", "py-cold", "py-cold-paced", "py-warm", "py-warm-paced"}
    if shutil.which("bwrap"):
        expected.add("py-bwrap")
    if shutil.which("node"):
        expected |= {"js-fresh", "js-cold", "js-warm", "js-warm-paced"}
        # CI has a compiler for the node fork addon: the forked path must be there.
        assert data["javascript"] == {"forked": True, "note": ""}
        expected |= {"js-fork-cold", "js-fork-warm", "js-fork-warm-paced"}
    assert {v["key"] for v in data["variants"]} == expected
    (repetition,) = data["repetitions"]
    for key in expected:
        summary = repetition["summaries"][key]
        assert summary["n"] == 3
        assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
        assert data["aggregate"][key]["p50"] == summary["p50"]
    runnerd = [v for v in data["variants"] if "pool_size" in v]
    assert all(v["layers"] for v in runnerd), "every runnerd step reports its layers"
    node_fork = {v["key"]: v["node_fork"] for v in runnerd if v["runtime"] == "node"}
    assert all(fork == key.startswith("js-fork-") for key, fork in node_fork.items())
    assert {t["variant"] for t in data["targets"]} == {v["key"] for v in runnerd}
    assert data["machine"]["cores"] and data["machine"]["sandbox layers on"]

    printed = capsys.readouterr().out
    for variant in data["variants"]:
        assert f"| {variant['label']} |" in printed
