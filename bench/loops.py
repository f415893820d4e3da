"""Scenario `loops`: for_each loops through a real `runnerd serve`, beside the same work
submitted as separate executions.

The seed's case: `--items` files (500), each parsed by a Python step (CSV text to rows) and
transformed by a JavaScript step (rows to a count and a total). Every repetition runs, in a
rotating order, on one worker:

- `loop-default`: one execution with a for_each step over the files, at the default
  parallelism (half the worker's concurrency): the targets are this case's;
- `loop`: the same, `--parallelism` at a time (the worker's concurrency by default: the loop
  alone on its worker);
- `executions`: the same files as that many separate two-step executions, submitted at once
  and all awaited (first submit to last result), the way an author without loops would;
- `loop-p1`: the loop with one item in flight, for comparison.

Each figure is one execution's end to end time (submit to result in hand), checked item by
item. Then, with `--distributed-items` above 0, one loop of that many items with
`"distribute": true` runs over two workers; the item counts are sampled every
`--sample-s` seconds to give items/s over time (a chart with `--png`).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench import report
from bench.progress import Progress
from bench.stats import Spread, spread
from bench.worker_args import add_worker_arguments, run_loop, worker_options
from bench.workers import Fleet
from runnerd.client import Client, Result
from runnerd.loop_store import LoopStore
from runnerd.messages import Integration

HELP = "for_each: 500 items (Python + JS) as one loop vs 500 executions; distributed items/s"
TARGET_LOOP_S = 5.0
RESULT_TIMEOUT_S = 900.0
ROWS = 20  # rows in each stand-in file

PARSE_PY = (
    "import csv, io\n"
    "def run(item, ctx):\n"
    "    rows = list(csv.DictReader(io.StringIO(item['csv'])))\n"
    "    return {'name': item['name'], 'rows': rows}\n"
)
TRANSFORM_JS = (
    "export function run(parsed, ctx) {\n"
    "  const total = parsed.rows.reduce((sum, r) => sum + Number(r.qty) * Number(r.price), 0);\n"
    "  return { name: parsed.name, rows: parsed.rows.length, total };\n"
    "}\n"
)
STEPS = [
    {"name": "parse", "source": PARSE_PY},
    {"name": "transform", "runtime": "node", "source": TRANSFORM_JS},
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser)
    parser.add_argument(
        "--items", type=int, default=500, help="files per loop and repetition (default 500)"
    )
    parser.add_argument(
        "--distributed-items",
        type=int,
        default=10_000,
        help="items of the distributed loop over two workers (default 10000; 0: skip it)",
    )
    parser.add_argument(
        "--sample-s",
        type=float,
        default=1.0,
        help="how often the distributed loop's counts are sampled (default 1 s)",
    )
    parser.add_argument(
        "--parallelism",
        type=int,
        default=0,
        help="the first loop case's parallelism (default the worker's --concurrency: a loop "
        "alone on its worker; the default parallelism, half of it, is its own case)",
    )
    parser.add_argument("--png", metavar="PATH", help="draw the distributed items/s chart here")
    parser.set_defaults(repeat=5, warmup=20)


def files(count: int, offset: int = 0) -> list[dict[str, Any]]:
    """`count` CSV files, each with its own numbers, so every result can be checked."""
    found = []
    for n in range(offset, offset + count):
        lines = ["id,qty,price"] + [f"{r},{(n + r) % 7 + 1},{r + 0.5}" for r in range(ROWS)]
        found.append({"name": f"file-{n}.csv", "csv": "\n".join(lines)})
    return found


def expected(file: dict[str, Any]) -> dict[str, Any]:
    n = int(file["name"].removeprefix("file-").removesuffix(".csv"))
    total = sum(((n + r) % 7 + 1) * (r + 0.5) for r in range(ROWS))
    return {"name": file["name"], "rows": ROWS, "total": total}


def loop(parallelism: int | None = None, distribute: bool = False) -> Integration:
    options: dict[str, Any] = {"items": "files", "steps": STEPS}
    if parallelism is not None:
        options["parallelism"] = parallelism
    if distribute:
        options["distribute"] = True
        options["max_items"] = 10_000
    name = "bench-loop-distributed" if distribute else "bench-loop"
    return Integration.from_dict({"name": name, "steps": [{"name": "each", "for_each": options}]})


def pair() -> Integration:
    return Integration.from_dict({"name": "bench-loop-pair", "steps": STEPS})


class WrongResult(Exception):
    """A loop or an execution did not return what its steps compute."""


def _check_loop(result: Result, inputs: list[dict[str, Any]]) -> None:
    if not result.ok:
        raise WrongResult(f"loop: {result.status} at {result.failed_step}: {result.error}")
    want = [expected(f) for f in inputs]
    if result.output != want:
        raise WrongResult(f"loop: got {repr(result.output)[:200]}")
    counts = result.steps[-1].items
    if counts is None or counts.succeeded != len(inputs):
        raise WrongResult(f"loop: item counts {counts}")


async def _one_loop(
    client: Client, integration: Integration, inputs: list[dict[str, Any]]
) -> tuple[float, set[str]]:
    started = time.perf_counter()
    result = await client.run(integration, {"files": inputs}, RESULT_TIMEOUT_S)
    took = time.perf_counter() - started
    _check_loop(result, inputs)
    return took, set()  # a loop step's report holds its items' counts, not their layers


async def _separate(client: Client, inputs: list[dict[str, Any]]) -> tuple[float, set[str]]:
    """Every file as its own execution, submitted at once, all awaited."""
    integration = pair()
    started = time.perf_counter()
    ids = await client.submit_many(integration, inputs)
    results = await asyncio.gather(*(client.wait(i, RESULT_TIMEOUT_S) for i in ids))
    took = time.perf_counter() - started
    layers: set[str] = set()
    for file, result in zip(inputs, results, strict=True):
        if not result.ok or result.output != expected(file):
            raise WrongResult(f"{file['name']}: {result.status} {repr(result.output)[:200]}")
        layers.update(*(step.outcome.layers for step in result.steps))
    return took, layers


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    run: Callable[[Client, list[dict[str, Any]]], Awaitable[tuple[float, set[str]]]]


def cases(parallelism: int) -> list[Case]:
    wide, default, serial = loop(parallelism), loop(), loop(parallelism=1)
    return [
        Case(
            "loop",
            f"one loop, parallelism {parallelism}",
            lambda c, i: _one_loop(c, wide, i),
        ),
        Case(
            "loop-default",
            "one loop, default parallelism (half the concurrency)",
            lambda c, i: _one_loop(c, default, i),
        ),
        Case("executions", "as separate executions", _separate),
        Case("loop-p1", "one loop, parallelism 1", lambda c, i: _one_loop(c, serial, i)),
    ]


@dataclass(frozen=True)
class Sample:
    at_s: float
    done: int


@dataclass(frozen=True)
class Distributed:
    items: int
    took_s: float
    samples: list[Sample]

    @property
    def per_s(self) -> float:
        return self.items / self.took_s


@dataclass(frozen=True)
class Outcome:
    items: int
    parallelism: int  # of the `loop` case
    seconds: dict[str, list[float]]  # per case, one per repetition
    layers: list[str]  # what the separate executions' steps ran under
    distributed: Distributed | None


async def _inline(args: argparse.Namespace) -> tuple[dict[str, list[float]], set[str]]:
    all_cases = cases(args.parallelism or args.concurrency)
    found: dict[str, list[float]] = {case.key: [] for case in all_cases}
    layers: set[str] = set()
    async with Fleet(1, worker_options(args)) as fleet:
        if args.warmup:
            await _one_loop(fleet.client, loop(), files(args.warmup, 10**6))
        for index in range(args.repeat):
            shift = index % len(all_cases)
            for case in all_cases[shift:] + all_cases[:shift]:
                took, ran_under = await case.run(
                    fleet.client, files(args.items, index * args.items)
                )
                found[case.key].append(took)
                layers |= ran_under
                print(
                    f"repetition {index + 1}/{args.repeat} {case.key:10} {took:7.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return found, layers


async def _distributed(args: argparse.Namespace) -> Distributed:
    inputs = files(args.distributed_items)
    async with Fleet(2, worker_options(args)) as fleet:
        client = fleet.client
        loops = LoopStore(client.redis, client.keys, 0)
        progress = Progress("distributed items", len(inputs))
        started = time.perf_counter()
        execution_id = await client.submit(loop(distribute=True), {"files": inputs})
        samples = [Sample(0.0, 0)]
        waiting = asyncio.ensure_future(client.wait(execution_id, RESULT_TIMEOUT_S))
        while not waiting.done():
            await asyncio.wait([waiting], timeout=args.sample_s)
            state = await loops.state(execution_id)
            if state is not None and not waiting.done():
                samples.append(Sample(time.perf_counter() - started, state.done))
                progress.advance(state.done - progress.done)
        result = waiting.result()
        took = time.perf_counter() - started
        progress.close()
        samples.append(Sample(took, len(inputs)))
        _check_loop(result, inputs)
    return Distributed(len(inputs), took, samples)


async def measure(args: argparse.Namespace) -> Outcome:
    seconds, layers = await _inline(args)
    distributed = await _distributed(args) if args.distributed_items > 0 else None
    parallelism = args.parallelism or args.concurrency
    return Outcome(args.items, parallelism, seconds, sorted(layers), distributed)


def rates(distributed: Distributed) -> list[tuple[float, float]]:
    """Items/s between consecutive samples, at each interval's end."""
    found = []
    for before, after in zip(distributed.samples, distributed.samples[1:], strict=False):
        if after.at_s > before.at_s:
            found.append((after.at_s, (after.done - before.done) / (after.at_s - before.at_s)))
    return found


def ratios(outcome: Outcome, key: str) -> Spread:
    """A case's time over the separate executions' within each repetition (the machine's
    speed drifts from one repetition to the next; within one, the cases run back to back)."""
    pairs = zip(outcome.seconds[key], outcome.seconds["executions"], strict=True)
    return spread([case / separate for case, separate in pairs])


def verdicts(outcome: Outcome) -> tuple[list[str], bool]:
    """The targets are the default loop's: what an author gets without tuning."""
    loop_s = spread(outcome.seconds["loop-default"])
    ratio = ratios(outcome, "loop-default")
    wide = ratios(outcome, "loop")
    under = loop_s.median <= TARGET_LOOP_S
    not_slower = ratio.median <= 1.0
    lines = [
        f"- loop of {outcome.items} items (default parallelism) p50 <= {TARGET_LOOP_S:g} s: "
        f"{loop_s.median:.2f} s: {'met' if under else 'missed'}",
        f"- loop no slower than {outcome.items} separate executions (same repetition): "
        f"median ratio {ratio.median:.2f} ({ratio.low:.2f}-{ratio.high:.2f}): "
        f"{'met' if not_slower else 'missed'}",
        f"- for comparison, parallelism {outcome.parallelism} over separate executions: median "
        f"ratio {wide.median:.2f} ({wide.low:.2f}-{wide.high:.2f})",
    ]
    met = under and not_slower
    if outcome.distributed is not None:
        d = outcome.distributed
        lines.append(
            f"- distributed: {d.items:,} items over 2 workers, all succeeded, in {d.took_s:.1f} s "
            f"({d.per_s:.0f} items/s)"
        )
    return lines, met


def table(outcome: Outcome) -> str:
    rows = []
    for case in cases(outcome.parallelism):
        found: Spread = spread(outcome.seconds[case.key])
        per_item_ms = found.median * 1000 / outcome.items
        rows.append(
            [
                case.label,
                f"{found.median:.2f} ({found.low:.2f}-{found.high:.2f})",
                f"{per_item_ms:.2f}",
                f"{outcome.items / found.median:.0f}",
            ]
        )
    return report.markdown_table(
        [f"{outcome.items} files, Python + JS each", "end to end s", "ms per item", "items/s"],
        rows,
    )


def _distributed_text(d: Distributed) -> str:
    per_s = [rate for _, rate in rates(d)]
    middle = per_s[1:-1] or per_s
    return (
        f"distributed: {d.items:,} items in {d.took_s:.1f} s, {d.per_s:.0f} items/s overall; "
        f"per {len(d.samples) - 2 or 1}-sample interval median {statistics.median(middle):.0f}, "
        f"low {min(middle):.0f}, high {max(middle):.0f} items/s"
    )


def run(args: argparse.Namespace, command: str) -> int:
    if args.items < 1 or args.distributed_items < 0 or args.sample_s <= 0:
        raise SystemExit("--items must be at least 1, --distributed-items at least 0")
    outcome: Outcome = run_loop(measure(args), args.loop)
    lines, met = verdicts(outcome)
    body = table(outcome)
    if outcome.distributed is not None:
        body += "\n\n" + _distributed_text(outcome.distributed)
        if args.png:
            from bench import chart

            info = report.machine_info(outcome.layers, args.loop, shutil.which("node"))
            chart.loop_items(args.png, rates(outcome.distributed), outcome.distributed, info)
    text = body + "\n\n" + "\n".join(lines)
    if args.markdown:
        info = report.machine_info(outcome.layers, args.loop, shutil.which("node"))
        print(report.document(f"## loops: {HELP}", command, info, text))
    else:
        print(text)
    if args.json:
        report.write_json(
            args.json, {"command": command, "config": report.config(args), "outcome": outcome}
        )
    return 0 if met else 1
