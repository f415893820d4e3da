"""Scenario `chain`: a 6-step integration, end to end, one execution at a time.

Each step transforms the previous step's output (v -> 2 v + i, and appends its index), so the
result proves all six ran in order. Latency is submit to result in hand, through Redis and a
real `runnerd serve`. With node installed, a second case makes every other step JavaScript.
"""

from __future__ import annotations

import argparse
import shutil

from bench import integrations, latency, report
from bench.stats import Aggregate
from bench.worker_args import add_worker_arguments

HELP = "6-step integration, end-to-end latency, sequential submissions"
TARGET_P50_MS = 25.0
TARGET_P99_MS = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser)
    parser.add_argument(
        "--runtime",
        choices=("python", "mixed", "both"),
        default="both",
        help="python: six Python steps; mixed: every other step JavaScript (default both, "
        "mixed only when node is installed)",
    )
    parser.add_argument(
        "--js-steps", type=int, default=0, help="executions of the mixed case (default --steps)"
    )


def cases(args: argparse.Namespace) -> list[latency.Case]:
    found = []
    if args.runtime in ("python", "both"):
        found.append(
            latency.Case(
                "python",
                "6 Python steps",
                integrations.chain(),
                integrations.chain_input,
                integrations.check_chain,
                args.steps,
                args.warmup,
            )
        )
    if args.runtime == "mixed" or (args.runtime == "both" and shutil.which("node")):
        found.append(
            latency.Case(
                "mixed",
                "3 Python + 3 JavaScript steps",
                integrations.chain(node_steps=True),
                integrations.chain_input,
                integrations.check_chain,
                args.js_steps or args.steps,
                args.warmup,
            )
        )
    return found


def verdicts(aggregates: dict[str, Aggregate]) -> list[str]:
    lines = []
    if "mixed" in aggregates:
        lines.append(
            "- mixed: no target (a node step costs more than a Python one); for comparison"
        )
    for key, agg in aggregates.items():
        if key != "python":
            continue
        met = agg.p50 <= TARGET_P50_MS and agg.p99 <= TARGET_P99_MS
        lines.append(
            f"- {key}: p50 <= {TARGET_P50_MS:g} ms and p99 <= {TARGET_P99_MS:g} ms: "
            f"p50 {report.ms(agg.p50)} ms, p99 {report.ms(agg.p99)} ms: "
            f"{'met' if met else 'missed'}"
        )
    return lines


def run(args: argparse.Namespace, command: str) -> int:
    return latency.run(args, command, f"## chain: {HELP}", cases(args), verdicts)
