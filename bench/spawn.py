"""Scenario `spawn`: per-step overhead of a trivial step, as the caller sees it.

The step returns its input. Its latency (submitted -> result in hand, one step at a time) is
almost all overhead: for runnerd a fork from the zygote, every confinement layer the host
allows and a result frame back (cold), or only the frame round trip when a warm, already
confined child is waiting (pool). Measured in the same run against starting a fresh
interpreter per step (`python3 -c`, `node -e`) and bwrap around `python3 -c`.

JavaScript runs both ways in the same run: forked from the warm node zygote (`js-fork-*`, the
default path) and with a node exec'd per step (`js-cold`, `js-warm*`: RUNNERD_NODE_FORK=false),
the baseline the forked variants are compared with.

Each repetition runs every variant in turn (the order rotates between repetitions), each with
a fresh Spawner: prime, warm up, measure. Figures are the median across repetitions of each
repetition's percentiles; ratios are taken within a repetition, then their median.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from bench import report
from bench.measure import time_steps
from bench.spawn_report import (
    Repetition,
    describe,
    layer_notes,
    markdown,
    ratio_spreads,
    table,
    targets,
    verdicts,
)
from bench.stats import Summary, aggregate, summarize
from bench.variants import BWRAP, JS_ONE_SHOT, PY_ONE_SHOT, Fresh, Runnerd, Variant
from runnerd.spawner import Spawner
from runnerd.zygote_link import SandboxOptions
from sandbox.protocol import Capabilities

HELP = "per-step overhead of a trivial step: runnerd cold and warm vs fresh processes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    slots = SandboxOptions().slots
    parser.add_argument(
        "--runtime", choices=("python", "node", "both"), default="both", help="default both"
    )
    parser.add_argument(
        "--pool-size", type=int, default=2, help="warm children per runtime (default 2)"
    )
    parser.add_argument(
        "--rate", type=float, default=100.0, help="paced Python steps per second (default 100)"
    )
    parser.add_argument(
        "--js-rate",
        type=float,
        default=10.0,
        help="paced JavaScript steps per second, forked and exec'd alike (default 10: a node "
        "start takes tens of ms)",
    )
    parser.add_argument(
        "--js-paths",
        choices=("fork", "exec", "both"),
        default="both",
        help="JavaScript forked from the node zygote, exec'd per step, or both (default both)",
    )
    parser.add_argument(
        "--uid-base",
        type=int,
        default=int(os.environ.get("RUNNERD_SANDBOX_UID_BASE", "0")),
        help="first step uid of each Spawner (default RUNNERD_SANDBOX_UID_BASE, else 0: the "
        "first free range)",
    )
    parser.add_argument(
        "--prime",
        type=int,
        default=slots,
        help=f"unmeasured steps before each runnerd Python and forked JavaScript measurement "
        f"(default {slots}, the slot count), so every slot's cgroups are set up, as in a daemon "
        "that has been running",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=0.25,
        help="pause between variants, so one's teardown is not measured in the next",
    )
    parser.add_argument(
        "--python",
        default=shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable,
        help="interpreter for the python3 -c baselines (default: python3 outside any venv)",
    )


def build_variants(
    args: argparse.Namespace, node: str | None, capabilities: Capabilities
) -> tuple[list[Variant], list[str]]:
    """The variants this host can run, and a note for each one it cannot. `capabilities` are
    the probe's, with JavaScript forking asked for (it says whether the fork path works)."""
    variants: list[Variant] = []
    skipped: list[str] = []
    if args.runtime in ("python", "both"):
        options = SandboxOptions(uid_base=args.uid_base, node_path=node or "")
        variants += _python_variants(args, options, skipped)
    if args.runtime in ("node", "both"):
        if node is None:
            skipped.append("JavaScript variants: node not found")
        else:
            variants += _node_variants(args, node, capabilities, skipped)
    return variants, skipped


def _python_variants(
    args: argparse.Namespace, options: SandboxOptions, skipped: list[str]
) -> list[Variant]:
    fresh = Fresh("py-fresh", "python3 -c", "python", argv=(args.python, "-c", PY_ONE_SHOT))
    variants: list[Variant] = [fresh]
    if shutil.which("bwrap"):
        argv = (*BWRAP, args.python, "-c", PY_ONE_SHOT)
        variants.append(
            Fresh("py-bwrap", "bwrap + python3 -c", "python", argv=argv, baselines=("py-fresh",))
        )
    else:
        skipped.append("bwrap + python3 -c: bwrap not found")
    baselines = tuple(v.key for v in variants)
    pool, rate = args.pool_size, args.rate
    for key, label, pool_size, rate_per_s in (
        ("py-cold", "runnerd python, cold, back-to-back", 0, 0.0),
        ("py-cold-paced", f"runnerd python, cold, {rate:g}/s", 0, rate),
        ("py-warm", f"runnerd python, pool {pool}, back-to-back", pool, 0.0),
        ("py-warm-paced", f"runnerd python, pool {pool}, {rate:g}/s", pool, rate),
    ):
        variants.append(
            Runnerd(
                key,
                label,
                "python",
                rate_per_s=rate_per_s,
                prime=args.prime,
                baselines=baselines,
                options=options,
                pool_size=pool_size,
            )
        )
    return variants


def _node_variants(
    args: argparse.Namespace, node: str, capabilities: Capabilities, skipped: list[str]
) -> list[Variant]:
    variants: list[Variant] = [Fresh("js-fresh", "node -e", "node", argv=(node, "-e", JS_ONE_SHOT))]
    paths = ("fork", "exec") if args.js_paths == "both" else (args.js_paths,)
    if "exec" in paths:
        variants += _node_path_variants(args, node, forked=False)
    if "fork" in paths and not capabilities.node_forked:
        skipped.append(f"forked JavaScript variants: {capabilities.node_fork_note or 'no node'}")
    elif "fork" in paths:
        variants += _node_path_variants(args, node, forked=True, compare_exec="exec" in paths)
    return variants


def _node_path_variants(
    args: argparse.Namespace, node: str, forked: bool, compare_exec: bool = False
) -> list[Variant]:
    """Cold, warm and paced JavaScript steps on one path: a node exec'd per step
    (RUNNERD_NODE_FORK=false, the baseline) or forked from the node zygote, each forked
    variant compared with the exec'd one of the same shape (paced at the same --js-rate).
    Only the forked path is primed: next to a node start, a slot's first-use cgroup setup
    (~0.3 ms) is noise; next to a fork it shows."""
    options = SandboxOptions(uid_base=args.uid_base, node_path=node, node_fork=forked)
    pool, rate = args.pool_size, args.js_rate
    name, prefix = ("runnerd node forked", "js-fork-") if forked else ("runnerd node exec'd", "js-")
    variants: list[Variant] = []
    for shape, label, pool_size, rate_per_s in (
        ("cold", f"{name}, cold, back-to-back", 0, 0.0),
        ("warm", f"{name}, pool {pool}, back-to-back", pool, 0.0),
        ("warm-paced", f"{name}, pool {pool}, {rate:g}/s", pool, rate),
    ):
        baselines = ("js-fresh", f"js-{shape}") if forked and compare_exec else ("js-fresh",)
        variants.append(
            Runnerd(
                prefix + shape,
                label,
                "node",
                rate_per_s=rate_per_s,
                prime=args.prime if forked else 0,
                baselines=baselines,
                options=options,
                pool_size=pool_size,
            )
        )
    return variants


# --- measuring ------------------------------------------------------------------------------


async def _probe(options: SandboxOptions) -> Capabilities:
    spawner = await Spawner.start(options)
    try:
        return spawner.capabilities
    finally:
        await spawner.close()


async def _measure(variant: Variant, args: argparse.Namespace) -> list[float]:
    await variant.start()
    try:
        if variant.prime:
            await time_steps(variant.run_one, variant.prime)
        if args.warmup:
            await time_steps(variant.run_one, args.warmup, variant.rate_per_s)
        return await time_steps(variant.run_one, args.steps, variant.rate_per_s)
    finally:
        await variant.close()


def _ratios(variants: list[Variant], summaries: dict[str, Summary]) -> dict[str, Any]:
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for variant in variants:
        mine = summaries[variant.key]
        ratios[variant.key] = {
            base: {"p50": mine.p50 / summaries[base].p50, "p99": mine.p99 / summaries[base].p99}
            for base in variant.baselines
        }
    return ratios


async def _repetitions(variants: list[Variant], args: argparse.Namespace) -> list[Repetition]:
    repetitions = []
    for index in range(args.repeat):
        shift = index % len(variants)
        order = variants[shift:] + variants[:shift]
        summaries: dict[str, Summary] = {}
        for variant in order:
            summary = summarize(await _measure(variant, args))
            summaries[variant.key] = summary
            print(
                f"repetition {index + 1}/{args.repeat} {variant.key:14} p50 {summary.p50:7.2f} "
                f"p99 {summary.p99:7.2f} max {summary.max:7.2f} ms",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(args.settle_s)
        repetitions.append(
            Repetition([v.key for v in order], summaries, _ratios(variants, summaries))
        )
    return repetitions


@dataclass(frozen=True)
class Outcome:
    variants: list[Variant]
    skipped: list[str]
    capabilities: Capabilities
    repetitions: list[Repetition]


async def _run_all(args: argparse.Namespace, node: str | None) -> Outcome:
    capabilities = await _probe(SandboxOptions(uid_base=args.uid_base, node_path=node or ""))
    variants, skipped = build_variants(args, node, capabilities)
    return Outcome(variants, skipped, capabilities, await _repetitions(variants, args))


def _run_loop(coroutine: Coroutine[Any, Any, Any], loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def run(args: argparse.Namespace, command: str) -> int:
    node = shutil.which("node")
    outcome: Outcome = _run_loop(_run_all(args, node), args.loop)
    variants, skipped, repetitions = outcome.variants, outcome.skipped, outcome.repetitions
    layers = outcome.capabilities.available()
    aggregates = {v.key: aggregate([r.summaries[v.key] for r in repetitions]) for v in variants}
    ratios = ratio_spreads(variants, repetitions)
    judged = verdicts(variants, aggregates, ratios)
    notes = skipped + layer_notes(variants, layers)
    info = report.machine_info(layers, args.loop, node)
    rendered = table(variants, aggregates, ratios)
    body = f"{rendered}\n\n{targets(judged, notes)}"
    print(markdown(command, info, body) if args.markdown else body)
    if args.json:
        report.write_json(
            args.json,
            {
                "scenario": "spawn",
                "command": command,
                "machine": info,
                "config": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
                "variants": [describe(v) for v in variants],
                "skipped": skipped,
                "javascript": {
                    "forked": outcome.capabilities.node_forked,
                    "note": outcome.capabilities.node_fork_note,
                },
                "notes": notes,
                "repetitions": repetitions,
                "aggregate": aggregates,
                "ratios": ratios,
                "targets": judged,
            },
        )
    return 0
