"""Run steps one after another on one Spawner, as a long-running runnerd does, and print their
reports as a JSON list. The hostile state tests use it to show that nothing one step does
reaches the next: each step gets a fresh child, warm ones included (a pool of 2), and the
Spawner's code cache carries over as it does in the daemon.

    python tests/hostile/sequence.py '[{"file": "a.py", "input": 1}, {"file": "b.mjs"}]'

An entry may say `"network": true`.

Settings (uid base, node path) come from the environment, as for `runnerd run-step`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from runnerd import settings as settings_module
from runnerd.cli import RUNTIMES
from runnerd.outcomes import outcome_json
from runnerd.spawner import Spawner, StepSpec
from runnerd.zygote_link import SandboxOptions
from sandbox.protocol import Limits

POOL_SIZE = 2


def step_spec(entry: dict[str, Any]) -> StepSpec:
    path = Path(entry["file"])
    data = msgspec.msgpack.encode(entry.get("input"))
    limits = Limits(network=bool(entry.get("network")))
    return StepSpec(RUNTIMES[path.suffix], path.name, path.read_text(), data, limits)


async def run_all(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    settings = settings_module.load(dict(os.environ))
    options = SandboxOptions.from_settings(settings)
    spawner = await Spawner.start(options, pool_size=POOL_SIZE)
    reports = []
    try:
        for entry in entries:
            reports.append(outcome_json(await spawner.run_step(step_spec(entry))))
    finally:
        await spawner.close()
    return reports


def main(argv: list[str]) -> None:
    reports = asyncio.run(run_all(json.loads(argv[0])))
    sys.stdout.write(msgspec.json.encode(reports).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
