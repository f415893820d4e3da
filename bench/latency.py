"""End-to-end latency of executions submitted one at a time through Redis to real workers.

Shared by `chain` and `payload`: each builds its cases (an integration, its inputs and its
check); every repetition runs each case in turn (the order rotates), warm-up then measured
executions, one at a time, on one fleet started for the run. The table shows the median over
repetitions of each repetition's percentiles and the range of its p50s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import report
from bench.load import Check, MakeInput, sequential
from bench.stats import Aggregate, Summary, aggregate, summarize
from bench.worker_args import run_loop, worker_options
from bench.workers import Fleet
from runnerd.messages import Integration


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    integration: Integration
    make_input: MakeInput
    check: Check
    count: int  # measured executions per repetition
    warmup: int


@dataclass(frozen=True)
class Outcome:
    cases: list[Case]
    summaries: dict[str, list[Summary]]  # per case, one per repetition
    aggregates: dict[str, Aggregate]
    layers: list[str]


async def measure(cases: list[Case], args: argparse.Namespace) -> Outcome:
    summaries: dict[str, list[Summary]] = {case.key: [] for case in cases}
    layers: set[str] = set()
    async with Fleet(1, worker_options(args)) as fleet:
        for index in range(args.repeat):
            shift = index % len(cases)
            for case in cases[shift:] + cases[:shift]:
                if case.warmup:
                    await sequential(
                        fleet.client, case.integration, case.warmup, case.make_input, case.check
                    )
                run = await sequential(
                    fleet.client,
                    case.integration,
                    case.count,
                    case.make_input,
                    case.check,
                    label=case.key,
                )
                layers |= run.layers
                summary = summarize(run.latencies_ms)
                summaries[case.key].append(summary)
                print(
                    f"repetition {index + 1}/{args.repeat} {case.key:10} p50 {summary.p50:8.2f} "
                    f"p99 {summary.p99:8.2f} max {summary.max:8.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    aggregates = {key: aggregate(found) for key, found in summaries.items()}
    return Outcome(cases, summaries, aggregates, sorted(layers))


def table(outcome: Outcome) -> str:
    rows = []
    for case in outcome.cases:
        agg = outcome.aggregates[case.key]
        rows.append(
            [
                case.label,
                str(case.count),
                report.ms(agg.p50),
                report.ms(agg.p90),
                report.ms(agg.p99),
                report.ms(agg.max),
                f"{report.ms(agg.p50_low)}..{report.ms(agg.p50_high)}",
            ]
        )
    headers = ["case", "n per rep.", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50 range ms"]
    return report.markdown_table(headers, rows)


def run(
    args: argparse.Namespace,
    command: str,
    heading: str,
    cases: list[Case],
    verdicts: Callable[[dict[str, Aggregate]], list[str]],
) -> int:
    outcome: Outcome = run_loop(measure(cases, args), args.loop)
    info = report.machine_info(outcome.layers, args.loop, shutil.which("node"))
    judged = verdicts(outcome.aggregates)
    body = table(outcome) + "\n\nTargets:\n\n" + "\n".join(judged) + "\n"
    print(report.document(heading, command, info, body) if args.markdown else body)
    if args.json:
        described: list[dict[str, Any]] = [
            {"key": c.key, "label": c.label, "count": c.count, "warmup": c.warmup} for c in cases
        ]
        report.write_json(
            args.json,
            {
                "scenario": heading.split(":")[0].removeprefix("## "),
                "command": command,
                "machine": info,
                "config": report.config(args),
                "cases": described,
                "repetitions": outcome.summaries,
                "aggregate": outcome.aggregates,
                "layers": outcome.layers,
                "targets": judged,
            },
        )
    return 0
