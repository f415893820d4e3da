"""Scenario `compare`: runnerd side by side with RQ, arq and Celery, on one Redis, in one run.

Every system gets the same two jobs: `--steps` trivial calls from `--clients` concurrent callers
(closed loop, executions/s), and `--chain-steps` 6-step chains one at a time, each step
transforming the previous output (end-to-end latency). Each stops early after `--max-seconds`,
so arq's 0.5 s poll does not hold the run up for minutes. Each repetition runs every system in
turn, the order rotating, each with workers started for it and stopped after; the table shows
medians over repetitions and, for ratios, the median of the per-repetition ratios, so a noisy
minute hits a ratio less than it hits an absolute figure.

runnerd runs one `runnerd serve` with every step sandboxed; the peers run plain functions with
no isolation at all. RQ runs `--peer-processes` workers (one job at a time each), Celery a
prefork pool of that many processes, arq one asyncio process (10 jobs at once, its default).
Peers live in their own venvs (bench/peers.py), made on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import integrations, peers, report
from bench.load import closed_loop, sequential
from bench.stats import Summary, spread, summarize
from bench.worker_args import add_worker_arguments, run_loop, worker_options
from bench.workers import Fleet

HELP = "runnerd vs RQ, arq and Celery: throughput and 6-step chain, same Redis, same run"
RUNNERD = "runnerd"
SYSTEMS = [RUNNERD, *peers.PEERS]
TARGET_RATIO = 3.0
TARGET_AGAINST = ("rq", "celery-fresh")  # the peers that also give every task a fresh process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser, concurrency=16)
    parser.add_argument("--clients", type=int, default=32, help="concurrent callers (default 32)")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma list, from {', '.join(SYSTEMS)} (default all)",
    )
    parser.add_argument(
        "--chain-steps", type=int, default=100, help="6-step chains per repetition (default 100)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="stop each measurement after this long (default 20)",
    )
    parser.add_argument(
        "--peer-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="RQ workers and Celery pool processes (default: the number of cores)",
    )
    parser.add_argument(
        "--peer-venvs",
        type=Path,
        default=peers.DEFAULT_VENVS,
        help=f"where the peers' venvs are made and reused (default {peers.DEFAULT_VENVS})",
    )
    parser.add_argument("--png", metavar="PATH", help="also draw the results as a PNG chart")
    parser.set_defaults(steps=2000, warmup=100, repeat=3)


@dataclass(frozen=True)
class Measured:
    """One system in one repetition."""

    per_s: float
    throughput: Summary
    chain: Summary


@dataclass
class SystemRuns:
    name: str
    label: str
    fresh_process: bool
    isolation: str
    repetitions: list[Measured] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def parse_systems(text: str) -> list[str]:
    # In the order given, each once.
    chosen = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in chosen if name not in SYSTEMS]
    if unknown or not chosen:
        raise SystemExit(
            f"--systems: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SYSTEMS)}"
        )
    return chosen


def new_runs(name: str) -> SystemRuns:
    if name == RUNNERD:
        return SystemRuns(RUNNERD, "runnerd serve, 1 process", True, "every step sandboxed")
    peer = peers.PEERS[name]
    return SystemRuns(name, peer.label, peer.fresh_process, "none")


async def measure_runnerd(args: argparse.Namespace, layers: set[str]) -> Measured:
    trivial, chain = integrations.trivial(), integrations.chain()
    async with Fleet(1, worker_options(args)) as fleet:
        client = fleet.client
        if args.warmup:
            await closed_loop(
                client,
                trivial,
                args.warmup,
                args.clients,
                integrations.trivial_input,
                integrations.check_trivial,
                label="runnerd: warm-up",
            )
        load = await closed_loop(
            client,
            trivial,
            args.steps,
            args.clients,
            integrations.trivial_input,
            integrations.check_trivial,
            args.max_seconds,
            "runnerd: throughput",
        )
        chained = await sequential(
            client,
            chain,
            args.chain_steps,
            integrations.chain_input,
            integrations.check_chain,
            args.max_seconds,
            "runnerd: chain",
        )
    layers |= load.layers | chained.layers
    return Measured(load.per_s, summarize(load.latencies_ms), summarize(chained.latencies_ms))


def measure_peer(name: str, args: argparse.Namespace, runs: SystemRuns) -> Measured:
    peer = peers.PEERS[name]
    venv = peers.ensure_venv(peer.system, args.peer_venvs)
    work = peers.Workload(
        args.redis_url,
        args.warmup,
        args.steps,
        args.clients,
        args.chain_steps,
        args.max_seconds,
        args.peer_processes,
    )
    found = peers.measure(peer, venv, work)
    runs.versions = found["versions"]
    load, chained = found["throughput"], found["chain"]
    return Measured(
        len(load["latencies_ms"]) / load["elapsed_s"],
        summarize(load["latencies_ms"]),
        summarize(chained["latencies_ms"]),
    )


async def measure_all(
    args: argparse.Namespace, names: list[str]
) -> tuple[list[SystemRuns], list[str]]:
    for system in sorted({peers.PEERS[n].system for n in names if n != RUNNERD}):
        peers.ensure_venv(system, args.peer_venvs)  # before any timing
    runs = {name: new_runs(name) for name in names}
    layers: set[str] = set()
    for index in range(args.repeat):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if name == RUNNERD:
                measured = await measure_runnerd(args, layers)
            else:
                measured = await asyncio.to_thread(measure_peer, name, args, runs[name])
            runs[name].repetitions.append(measured)
            print(
                f"repetition {index + 1}/{args.repeat} {name:13} {measured.per_s:7.0f} /s, "
                f"chain p50 {report.ms(measured.chain.p50)} ms ({measured.chain.n} chains)",
                file=sys.stderr,
                flush=True,
            )
    return list(runs.values()), sorted(layers)


def ratio(runs: SystemRuns, base: SystemRuns, chain: bool = False) -> float | None:
    """Median over repetitions of runnerd's advantage: its rate over the peer's, or the
    peer's chain p50 over runnerd's (above 1: runnerd is faster either way)."""
    if runs is base or not base.repetitions:
        return None
    pairs = zip(runs.repetitions, base.repetitions, strict=True)
    if chain:
        return statistics.median(r.chain.p50 / b.chain.p50 for r, b in pairs)
    return statistics.median(b.per_s / r.per_s for r, b in pairs)


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}x"


def table(all_runs: list[SystemRuns]) -> str:
    base = next((r for r in all_runs if r.name == RUNNERD), None)
    rows = []
    for runs in all_runs:
        rate = spread([m.per_s for m in runs.repetitions])
        chain_p50 = spread([m.chain.p50 for m in runs.repetitions])
        rows.append(
            [
                f"{runs.name}: {runs.label}",
                "yes" if runs.fresh_process else "no",
                runs.isolation,
                f"{rate.median:.0f} ({rate.low:.0f}..{rate.high:.0f})",
                _x(ratio(runs, base)) if base else "",
                report.ms(statistics.median(m.throughput.p50 for m in runs.repetitions)),
                f"{report.ms(chain_p50.median)} "
                f"({report.ms(chain_p50.low)}..{report.ms(chain_p50.high)})",
                report.ms(statistics.median(m.chain.p99 for m in runs.repetitions)),
                _x(ratio(runs, base, chain=True)) if base else "",
                str(sum(m.chain.n for m in runs.repetitions)),
            ]
        )
    headers = [
        "system",
        "fresh process per task",
        "isolation",
        "executions/s (range)",
        "runnerd's rate is",
        "throughput p50 ms",
        "chain p50 ms (range)",
        "chain p99 ms",
        "runnerd's chain is",
        "chains measured",
    ]
    return report.markdown_table(headers, rows)


def verdicts(all_runs: list[SystemRuns]) -> list[str]:
    by_name = {r.name: r for r in all_runs}
    base = by_name.get(RUNNERD)
    if base is None:
        return []
    lines = []
    for name in TARGET_AGAINST:
        if name in by_name:
            found = ratio(by_name[name], base)
            assert found is not None
            met = "met" if found >= TARGET_RATIO else "missed"
            lines.append(f"- runnerd executions/s >= {TARGET_RATIO:g}x {name}: {found:.1f}x: {met}")
    return lines


def versions(all_runs: list[SystemRuns]) -> str:
    lines = [
        f"- {runs.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(runs.versions.items()))
        for runs in all_runs
        if runs.versions
    ]
    return "Versions measured:\n\n" + "\n".join(lines) if lines else ""


def run(args: argparse.Namespace, command: str) -> int:
    if min(args.chain_steps, args.peer_processes, args.clients) < 1 or args.max_seconds <= 0:
        raise SystemExit(
            "--chain-steps, --clients and --peer-processes must be at least 1, "
            "--max-seconds above 0"
        )
    names = parse_systems(args.systems)
    try:
        all_runs, layers = run_loop(measure_all(args, names), args.loop)
    except peers.PeerFailed as failed:
        print(f"bench compare: {failed}", file=sys.stderr)
        return 1
    info = report.machine_info(layers, args.loop, shutil.which("node"))
    body = table(all_runs)
    judged = verdicts(all_runs)
    if judged:
        body += "\n\nTargets:\n\n" + "\n".join(judged)
    if found := versions(all_runs):
        body += "\n\n" + found
    print(report.document(f"## compare: {HELP}", command, info, body) if args.markdown else body)
    if args.json:
        data: dict[str, Any] = {
            "scenario": "compare",
            "command": command,
            "machine": info,
            "config": report.config(args),
            "systems": all_runs,
            "targets": judged,
        }
        report.write_json(args.json, data)
    if args.png:
        from bench import chart

        chart.compare(args.png, all_runs, info)
    return 0
