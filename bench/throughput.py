"""Scenario `throughput`: trivial single-step Python executions through Redis, closed loop.

A fixed number of callers each submit an execution and wait for its result, then submit the
next, against real `runnerd serve` processes started for the run. Executions/s is executions
over first submit to last result, one figure per repetition; the table shows the median and
the range over repetitions. The workers' resident memory is read after the warm-up and after
each repetition, to see whether it stays flat. `scale` is this scenario with 1 and 2 workers.

Each worker count gets its own fleet (started, warmed up, measured `--repeat` times, stopped);
the harness's callers run on the same machine as the workers and compete for its cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from bench import cpu, integrations, report
from bench.load import closed_loop
from bench.stats import Summary, spread, summarize
from bench.worker_args import add_worker_arguments, run_loop, worker_options
from bench.workers import Fleet, Memory

HELP = "executions/s of trivial one-step executions through Redis, fixed concurrent callers"
TARGET_PER_S = 500.0  # with one worker process, every step sandboxed


def add_arguments(parser: argparse.ArgumentParser, workers: str = "1") -> None:
    add_worker_arguments(parser, concurrency=16)
    parser.add_argument("--clients", type=int, default=32, help="concurrent callers (default 32)")
    parser.add_argument(
        "--workers",
        default=workers,
        help=f"comma list of worker process counts, each measured on its own (default {workers})",
    )
    parser.set_defaults(steps=3000, warmup=300)


@dataclass(frozen=True)
class Repetition:
    workers: int
    per_s: float
    latency: Summary
    cpu: cpu.Split
    memory_after: list[Memory]


@dataclass(frozen=True)
class FleetRun:
    workers: int
    memory_warm: list[Memory]  # after the warm-up, before the first repetition
    repetitions: list[Repetition]
    layers: list[str]


async def measure_fleet(workers: int, args: argparse.Namespace) -> FleetRun:
    integration = integrations.trivial()
    async with Fleet(workers, worker_options(args)) as fleet:

        async def drive(count: int) -> Any:
            return await closed_loop(
                fleet.client,
                integration,
                count,
                args.clients,
                integrations.trivial_input,
                integrations.check_trivial,
                label=f"{workers} worker(s)",
            )

        if args.warmup:
            await drive(args.warmup)
        warm = fleet.memory()
        repetitions = []
        layers: set[str] = set()
        pids = [p.pid for p in fleet.processes]
        for index in range(args.repeat):
            before = cpu.snapshot(pids)
            run = await drive(args.steps)
            split = cpu.between(before, cpu.snapshot(pids))
            layers |= run.layers
            repetition = Repetition(
                workers, run.per_s, summarize(run.latencies_ms), split, fleet.memory()
            )
            repetitions.append(repetition)
            print(
                f"{workers} worker(s) repetition {index + 1}/{args.repeat}: "
                f"{run.per_s:.0f} executions/s, p50 {repetition.latency.p50:.1f} ms, "
                f"user {split.user_pct:.0f}% sys {split.system_pct:.0f}%",
                file=sys.stderr,
                flush=True,
            )
    return FleetRun(workers, warm, repetitions, sorted(layers))


async def measure_all(args: argparse.Namespace) -> list[FleetRun]:
    return [await measure_fleet(count, args) for count in parse_counts(args.workers)]


def parse_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--workers: positive counts expected, got {text!r}")
    return counts


def _mib(memory: list[Memory]) -> str:
    return " + ".join(f"{m.worker_mib:.0f}" for m in memory)


def table(runs: list[FleetRun]) -> str:
    rows = []
    for run in runs:
        per_s = spread([r.per_s for r in run.repetitions])
        p50 = spread([r.latency.p50 for r in run.repetitions])
        p99 = spread([r.latency.p99 for r in run.repetitions])
        user = spread([r.cpu.user_pct for r in run.repetitions])
        system = spread([r.cpu.system_pct for r in run.repetitions])
        # CPU the workers, zygotes and steps used per execution: less noisy than the rate
        # on a shared machine, and what bounds the rate (2 cores: 2000 ms of CPU per second).
        cost_user = spread([r.cpu.workers_user_s * 1000 / r.latency.n for r in run.repetitions])
        cost_sys = spread([r.cpu.workers_system_s * 1000 / r.latency.n for r in run.repetitions])
        rows.append(
            [
                str(run.workers),
                f"{per_s.median:.0f}",
                f"{per_s.low:.0f}..{per_s.high:.0f}",
                report.ms(p50.median),
                report.ms(p99.median),
                f"{user.median:.0f} / {system.median:.0f}",
                f"{cost_user.median:.1f} / {cost_sys.median:.1f}",
                f"{_mib(run.memory_warm)} -> {_mib(run.repetitions[-1].memory_after)}",
            ]
        )
    headers = [
        "workers",
        "executions/s",
        "range",
        "latency p50 ms",
        "p99 ms",
        "machine CPU user / sys %",
        "worker CPU ms per execution, user / sys",
        "worker RSS MiB (warm -> end)",
    ]
    return report.markdown_table(headers, rows)


def verdicts(runs: list[FleetRun]) -> list[str]:
    lines = []
    for run in runs:
        if run.workers == 1:
            median = spread([r.per_s for r in run.repetitions]).median
            met = "met" if median >= TARGET_PER_S else "missed"
            lines.append(f"- 1 worker: >= {TARGET_PER_S:g} executions/s: {median:.0f}: {met}")
    return lines


def run(args: argparse.Namespace, command: str, heading: str = "throughput") -> int:
    runs: list[FleetRun] = run_loop(measure_all(args), args.loop)
    layers = sorted(set().union(*(r.layers for r in runs)))
    info = report.machine_info(layers, args.loop, shutil.which("node"))
    body = table(runs)
    judged = verdicts(runs)
    if judged:
        body += "\n\nTargets:\n\n" + "\n".join(judged)
    title = f"## {heading}: {HELP}"
    print(report.document(title, command, info, body) if args.markdown else body)
    if args.json:
        report.write_json(
            args.json,
            {
                "scenario": heading,
                "command": command,
                "machine": info,
                "config": report.config(args),
                "fleets": runs,
                "targets": judged,
            },
        )
    return 0
