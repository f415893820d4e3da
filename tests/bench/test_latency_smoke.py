"""The chain and payload scenarios run end to end with tiny sizes against a real worker and
the shared Redis and report sane figures (never speed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import cli

WORKER = ["--concurrency", "2", "--pool-size", "1", "--uid-base", "641000"]


def _run(argv: list[str], tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "out.json"
    assert cli.main([*argv, *WORKER, "--json", str(out), "--markdown"]) == 0
    data: dict[str, object] = json.loads(out.read_text())
    return data


def _assert_sane(data: dict[str, object], keys: set[str], count: dict[str, int]) -> None:
    assert {c["key"] for c in data["cases"]} == keys  # type: ignore[attr-defined]
    assert data["layers"], "every step reports its confinement layers"
    for key in keys:
        (summary,) = data["repetitions"][key]  # type: ignore[index]
        assert summary["n"] == count[key]
        assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
    assert data["targets"]


def test_chain_reports_each_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _run(["chain", "--repeat", "1", "--steps", "4", "--warmup", "1"], tmp_path)
    keys = {"python", "mixed", "js"} if shutil.which("node") else {"python"}
    _assert_sane(data, keys, dict.fromkeys(keys, 4))
    assert "| 6 Python steps | 4 |" in capsys.readouterr().out


def test_payload_reports_each_size(tmp_path: Path) -> None:
    argv = ["payload", "--repeat", "1", "--steps", "3", "--warmup", "0", "--large-steps", "1"]
    data = _run([*argv, "--sizes", "1KB,1MB,10MB"], tmp_path)
    _assert_sane(data, {"1KB", "1MB", "10MB"}, {"1KB": 3, "1MB": 3, "10MB": 1})
