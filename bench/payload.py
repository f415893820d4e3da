"""Scenario `payload`: the 6-step chain carrying 1 KB to 64 MB through every step.

Each step reads the payload's length and first and last bytes and returns it with a hop count,
so all of it crosses every step boundary (Redis in, six children, checkpoints, Redis out). The
payload is random bytes, made once per size. Large sizes get fewer executions (`--large-steps`).
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from typing import Any

from bench import integrations, latency, report
from bench.stats import Aggregate
from bench.worker_args import add_worker_arguments
from runnerd.client import Result

HELP = "6-step chain passing 1 KB .. 64 MB through every step, end-to-end latency per size"
SIZES = {"1KB": 2**10, "1MB": 2**20, "10MB": 10 * 2**20, "64MB": 64 * 2**20}
LARGE = 10 * 2**20  # from this size on, --large-steps executions
TARGET_10MB_P50_MS = 400.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser)
    parser.add_argument(
        "--sizes",
        default=",".join(SIZES),
        help=f"comma list among {', '.join(SIZES)} (default all)",
    )
    parser.add_argument(
        "--large-steps",
        type=int,
        default=10,
        help="executions per repetition of 10MB and 64MB (default 10)",
    )
    parser.set_defaults(steps=50, warmup=3)


def _make_input(data: bytes, n: int) -> dict[str, Any]:
    return integrations.payload_input(n, data)


def _check(data: bytes, n: int, result: Result) -> list[str]:
    return integrations.check_payload(n, data, result)


def cases(args: argparse.Namespace) -> list[latency.Case]:
    integration = integrations.payload()
    found = []
    for name in args.sizes.split(","):
        if name not in SIZES:
            raise SystemExit(f"--sizes: unknown size {name!r}; known: {', '.join(SIZES)}")
        data = os.urandom(SIZES[name])
        large = SIZES[name] >= LARGE
        found.append(
            latency.Case(
                name,
                f"{name} through 6 steps",
                integration,
                partial(_make_input, data),
                partial(_check, data),
                args.large_steps if large else args.steps,
                min(args.warmup, 1) if large else args.warmup,
            )
        )
    return found


def verdicts(aggregates: dict[str, Aggregate]) -> list[str]:
    lines = []
    if "10MB" in aggregates:
        p50 = aggregates["10MB"].p50
        met = "met" if p50 <= TARGET_10MB_P50_MS else "missed"
        lines.append(f"- 10MB: p50 <= {TARGET_10MB_P50_MS:g} ms: {report.ms(p50)} ms: {met}")
    if "64MB" in aggregates:
        lines.append("- 64MB: works: every execution succeeded with its payload intact: met")
    return lines


def run(args: argparse.Namespace, command: str) -> int:
    return latency.run(args, command, f"## payload: {HELP}", cases(args), verdicts)
