"""Scenario `chain`: a 6-step integration, end to end, one execution at a time.

Each step transforms the previous step's output (v -> 2 v + i, and appends its index), so the
result proves all six ran in order. Latency is submit to result in hand, through Redis and a
real `runnerd serve`. With node installed, a second case makes every other step JavaScript,
and a third makes all six JavaScript. JavaScript steps take the path the worker is given
(RUNNERD_NODE_FORK in the environment: forked from the node zygote by default); `bench js`
measures the all-JavaScript chain on both paths in one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Literal

from bench import integrations, latency, report
from bench.stats import Aggregate
from bench.worker_args import add_worker_arguments

HELP = "6-step integration, end-to-end latency, sequential submissions"
TARGET_P50_MS = 25.0
TARGET_P99_MS = 60.0
TARGET_JS_P50_MS = 40.0  # six JavaScript steps forked from the node zygote


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser)
    parser.add_argument(
        "--runtime",
        choices=("python", "mixed", "js", "both", "all"),
        default="all",
        help="python: six Python steps; mixed: every other step JavaScript; js: six JavaScript "
        "steps; both: python and mixed; all: the three (default all; the JavaScript cases only "
        "when node is installed)",
    )
    parser.add_argument(
        "--js-steps",
        type=int,
        default=0,
        help="executions of the mixed and js cases (default --steps)",
    )


def cases(args: argparse.Namespace) -> list[latency.Case]:
    found = []
    if args.runtime in ("python", "both", "all"):
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
    node = shutil.which("node") is not None
    with_node: list[tuple[Literal["mixed", "js"], str, tuple[str, ...]]] = [
        ("mixed", "3 Python + 3 JavaScript steps", ("both", "all")),
        ("js", "6 JavaScript steps", ("all",)),
    ]
    for key, label, wanted in with_node:
        if args.runtime == key or (args.runtime in wanted and node):
            found.append(
                latency.Case(
                    key,
                    label,
                    integrations.chain(key),
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
    if "python" in aggregates:
        agg = aggregates["python"]
        met = agg.p50 <= TARGET_P50_MS and agg.p99 <= TARGET_P99_MS
        lines.append(
            f"- python: p50 <= {TARGET_P50_MS:g} ms and p99 <= {TARGET_P99_MS:g} ms: "
            f"p50 {report.ms(agg.p50)} ms, p99 {report.ms(agg.p99)} ms: "
            f"{'met' if met else 'missed'}"
        )
    if "js" in aggregates and not _forked():
        lines.append("- js: no target with RUNNERD_NODE_FORK=false (a node started per step)")
    elif "js" in aggregates:
        agg = aggregates["js"]
        lines.append(
            f"- js: p50 <= {TARGET_JS_P50_MS:g} ms (JavaScript steps forked from the node "
            f"zygote): p50 {report.ms(agg.p50)} ms: "
            f"{'met' if agg.p50 <= TARGET_JS_P50_MS else 'missed'}"
        )
    return lines


def _forked() -> bool:
    """Whether the worker is asked to fork JavaScript steps (it inherits this environment)."""
    return os.environ.get("RUNNERD_NODE_FORK", "true").strip().lower() not in ("false", "0")


def run(args: argparse.Namespace, command: str) -> int:
    return latency.run(args, command, f"## chain: {HELP}", cases(args), verdicts)
