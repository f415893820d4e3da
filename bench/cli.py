"""`python -m bench SCENARIO [flags]`: parse, run one scenario, return its exit code."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from bench import (
    bundles,
    chain,
    compare,
    js,
    loops,
    openloop,
    payload,
    scale,
    spawn,
    throughput,
    waits,
)

# name -> module with add_arguments(parser) and run(args, command) -> int
SCENARIOS: dict[str, ModuleType] = {
    "spawn": spawn,
    "throughput": throughput,
    "scale": scale,
    "chain": chain,
    "js": js,
    "payload": payload,
    "open-loop": openloop,
    "compare": compare,
    "waits": waits,
    "bundles": bundles,
    "loops": loops,
}


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument(
        "--steps", type=int, default=200, help="measured steps per variant and repetition"
    )
    parser.add_argument(
        "--warmup", type=int, default=20, help="unmeasured steps before each measurement"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print a full markdown report (machine, command, table, targets)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the caller (default uvloop, as the daemon uses)",
    )


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeat < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--repeat and --steps must be at least 1, --warmup at least 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark scenarios for runnerd; figures are kept in bench/RESULTS.md.",
    )
    commands = parser.add_subparsers(dest="scenario", required=True)
    for name, module in SCENARIOS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__)
        _add_common_arguments(sub)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    _positive(parser, args)
    command = shlex.join(["python", "-m", "bench", *args_list])
    run: Callable[[argparse.Namespace, str], int] = SCENARIOS[args.scenario].run
    return run(args, command)
