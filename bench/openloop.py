"""Scenario `open-loop`: trivial executions offered at fixed rates, stepping up to saturation.

At each rate executions are submitted at their intended times (i / rate) whether or not the
earlier ones have finished, and each latency runs from the intended send time, so a backlog
shows as latency rather than as a quietly lower rate (no coordinated omission). The steps stop
after the first rate the fleet could not keep up with: served below 90 % of offered, or p99
above `--stop-p99-ms`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass

from bench import integrations, report
from bench.load import open_loop
from bench.stats import Aggregate, aggregate, spread, summarize
from bench.worker_args import add_worker_arguments, run_loop, worker_options
from bench.workers import Fleet

HELP = "trivial executions at fixed offered rates up to saturation; latency from intended send"
KEEP_UP = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser, concurrency=16)
    parser.add_argument(
        "--rates",
        default="25,50,100,150,200,250,300,400,500",
        help="offered executions/s, in order (default 25,50,100,150,200,250,300,400,500)",
    )
    parser.add_argument(
        "--duration-s", type=float, default=5.0, help="seconds offered per rate (default 5)"
    )
    parser.add_argument(
        "--stop-p99-ms",
        type=float,
        default=1000.0,
        help="stop stepping up after a rate whose p99 exceeds this (default 1000)",
    )
    parser.add_argument("--png", metavar="PATH", help="also draw latency vs offered rate as a PNG")
    parser.set_defaults(repeat=3, warmup=100)


@dataclass(frozen=True)
class Level:
    rate_per_s: float
    served_per_s: list[float]
    latency: Aggregate
    saturated: bool


async def measure(args: argparse.Namespace) -> tuple[list[Level], list[str]]:
    integration = integrations.trivial()
    levels: list[Level] = []
    layers: set[str] = set()
    async with Fleet(1, worker_options(args)) as fleet:

        async def offer(rate: float, duration_s: float) -> tuple[float, list[float]]:
            run = await open_loop(
                fleet.client,
                integration,
                rate,
                duration_s,
                integrations.trivial_input,
                integrations.check_trivial,
            )
            layers.update(run.layers)
            return run.per_s, run.latencies_ms

        if args.warmup:
            await offer(min(_rates(args.rates)), args.warmup / min(_rates(args.rates)))
        for rate in _rates(args.rates):
            served, summaries = [], []
            for _ in range(args.repeat):
                per_s, latencies = await offer(rate, args.duration_s)
                served.append(per_s)
                summaries.append(summarize(latencies))
            agg = aggregate(summaries)
            saturated = spread(served).median < KEEP_UP * rate or agg.p99 > args.stop_p99_ms
            levels.append(Level(rate, served, agg, saturated))
            print(
                f"offered {rate:g}/s: served {spread(served).median:.0f}/s, "
                f"p50 {agg.p50:.1f} p99 {agg.p99:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
            if saturated:
                break
    return levels, sorted(layers)


def _rates(text: str) -> list[float]:
    rates = [float(part) for part in text.split(",") if part.strip()]
    if not rates or min(rates) <= 0:
        raise SystemExit(f"--rates: positive rates expected, got {text!r}")
    return rates


def table(levels: list[Level]) -> str:
    rows = [
        [
            f"{level.rate_per_s:g}",
            f"{spread(level.served_per_s).median:.0f}",
            report.ms(level.latency.p50),
            report.ms(level.latency.p90),
            report.ms(level.latency.p99),
            report.ms(level.latency.max),
            "saturated" if level.saturated else "",
        ]
        for level in levels
    ]
    headers = ["offered /s", "served /s", "p50 ms", "p90 ms", "p99 ms", "max ms", ""]
    return report.markdown_table(headers, rows)


def run(args: argparse.Namespace, command: str) -> int:
    levels, layers = run_loop(measure(args), args.loop)
    info = report.machine_info(layers, args.loop, shutil.which("node"))
    body = table(levels)
    heading = f"## open-loop: {HELP}"
    print(report.document(heading, command, info, body) if args.markdown else body)
    if args.json:
        report.write_json(
            args.json,
            {
                "scenario": "open-loop",
                "command": command,
                "machine": info,
                "config": report.config(args),
                "levels": levels,
                "layers": layers,
            },
        )
    if args.png:
        from bench import chart

        chart.open_loop(args.png, levels, info)
    return 0
