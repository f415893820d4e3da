"""Scenario `scale`: the throughput scenario with 1 and then 2 worker processes.

Each count gets its own fleet; with more workers than cores the workers, their zygotes, the
steps, Redis and the harness's callers all share the same cores, so this shows what a second
process buys on one machine, not across machines.
"""

from __future__ import annotations

import argparse

from bench import throughput

HELP = "throughput with 1 and 2 worker processes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    throughput.add_arguments(parser, workers="1,2")


def run(args: argparse.Namespace, command: str) -> int:
    return throughput.run(args, command, heading="scale")
