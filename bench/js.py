"""Scenario `js`: JavaScript steps forked from the node zygote beside a node exec'd per step.

Two `runnerd serve` workers run side by side for the whole run, each with its own key prefix
and uids: one forks JavaScript steps from its warm node zygote (the default path), the other
has RUNNERD_NODE_FORK=false and starts a node per step (the baseline). The harness checks each
is on the path it was given: the node zygote is in the first one's process tree, and stays the
same process, and is not in the second's. The idle worker costs nothing measurable.

Each repetition runs every case in turn, the order rotating: per path, trivial JavaScript and
trivial Python single-step executions from `--clients` callers (closed loop; executions/s is
executions over first submit to last result), then a 6-step all-JavaScript chain one at a
time; and `--node-starts` bare `node -e 0`, one after another, for the CPU one node start
costs. CPU per execution is the CPU of the worker's whole process tree over the measurement
(the worker, the zygote, the node zygote with the intermediates it forks, and every step child,
reaped ones included: each is reaped by the zygote, cpu.by_role) over the executions. Figures
are medians over repetitions; ratios are taken within a repetition, then their median.

`--soak N` runs N trivial JavaScript executions on the forked path instead, reading the
resident memory of the worker, its zygote and its node zygote `--soak-samples` times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from bench import cpu, integrations, js_report, report
from bench.js_report import Repetition, SoakSample, Throughput
from bench.load import Run, closed_loop, sequential
from bench.stats import summarize
from bench.variants import FRESH_ENV
from bench.worker_args import add_worker_arguments, run_loop, worker_options
from bench.workers import Fleet, WorkerOptions, sandbox_processes, tree_memory

HELP = "JavaScript forked vs exec'd per step, through one worker each: rate, CPU, chain, RSS"
JsPath = Literal["fork", "exec"]
Runtime = Literal["node", "python"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser, concurrency=16)
    parser.add_argument("--clients", type=int, default=32, help="concurrent callers (default 32)")
    parser.add_argument(
        "--paths",
        choices=("both", "fork", "exec"),
        default="both",
        help="JavaScript forked from the node zygote, exec'd per step, or both (default both)",
    )
    parser.add_argument(
        "--exec-steps",
        type=int,
        default=200,
        help="measured JavaScript executions on the exec path (default 200: a node start each)",
    )
    parser.add_argument(
        "--chain-steps", type=int, default=100, help="6-step JS chains, forked (default 100)"
    )
    parser.add_argument(
        "--exec-chain-steps", type=int, default=20, help="6-step JS chains, exec (default 20)"
    )
    parser.add_argument(
        "--chain-warmup", type=int, default=5, help="unmeasured chains before each (default 5)"
    )
    parser.add_argument(
        "--node-starts", type=int, default=20, help="bare `node -e 0` per repetition (default 20)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="stop each measurement after this long (default 60)",
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="instead: N trivial JavaScript executions on the forked path, RSS sampled",
    )
    parser.add_argument(
        "--soak-samples", type=int, default=20, help="RSS readings over the soak (default 20)"
    )
    parser.set_defaults(steps=1000, warmup=100, repeat=3)


# --- the two workers ------------------------------------------------------------------------


class WrongPath(Exception):
    """A worker's JavaScript steps are not on the path it was started for."""


@dataclass
class Worker:
    """One fleet of one worker, on one JavaScript path."""

    path: JsPath
    fleet: Fleet
    node_zygote_pid: int | None = None  # the forked path's, checked not to change
    pids: dict[str, int | None] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.fleet.processes[0].pid

    def check_path(self) -> None:
        sandbox = sandbox_processes(self.pid)
        if sandbox.zygote is None:
            raise WrongPath(f"{self.path} worker: no zygote found\n{self.fleet.log_tail(0)}")
        node = sandbox.node_zygote.pid if sandbox.node_zygote is not None else None
        if self.path == "exec" and node is not None:
            raise WrongPath("exec worker: a node zygote runs, RUNNERD_NODE_FORK=false was ignored")
        if self.path == "fork" and node is None:
            raise WrongPath(
                "fork worker: no node zygote, JavaScript steps start a node each:\n"
                + self.fleet.log_tail(0)
            )
        if self.node_zygote_pid is not None and node != self.node_zygote_pid:
            changed = f"{self.node_zygote_pid} -> {node}"
            raise WrongPath(f"fork worker: the node zygote changed ({changed})")
        self.node_zygote_pid = node
        self.pids = {"worker": self.pid, "zygote": sandbox.zygote.pid, "node zygote": node}

    def cpu(self) -> cpu.ByRole:
        return cpu.by_role(self.pid, self.pids["zygote"], self.pids["node zygote"])


def _paths(args: argparse.Namespace) -> list[JsPath]:
    if args.soak:
        return ["fork"]
    return ["fork", "exec"] if args.paths == "both" else [args.paths]


def _options(args: argparse.Namespace, index: int, path: JsPath) -> WorkerOptions:
    """Each worker its own uids: one claims slots + 1 from its base."""
    options = worker_options(args)
    base = options.uid_base + index * (options.slots + 1)
    return dataclasses.replace(options, uid_base=base, node_fork=path == "fork")


# --- one measurement ------------------------------------------------------------------------


async def throughput(
    worker: Worker, runtime: Runtime, count: int, warmup: int, args: argparse.Namespace
) -> Throughput:
    integration = integrations.trivial(runtime)
    make, check = integrations.trivial_input, integrations.check_trivial
    client, label = worker.fleet.client, f"{worker.path} {runtime}"
    if warmup:
        await closed_loop(client, integration, warmup, args.clients, make, check)
    clients, seconds = args.clients, args.max_seconds
    return await _measured(
        worker,
        lambda: closed_loop(client, integration, count, clients, make, check, seconds, label),
    )


async def chain(worker: Worker, count: int, args: argparse.Namespace) -> Throughput:
    integration = integrations.chain("js")
    make, check = integrations.chain_input, integrations.check_chain
    client, label = worker.fleet.client, f"{worker.path} chain"
    if args.chain_warmup:
        await sequential(client, integration, args.chain_warmup, make, check)
    return await _measured(
        worker,
        lambda: sequential(client, integration, count, make, check, args.max_seconds, label),
    )


async def _measured(worker: Worker, drive: Callable[[], Awaitable[Run]]) -> Throughput:
    """Drive the worker; its tree's CPU per execution by role, its path checked either side."""
    worker.check_path()
    before = worker.cpu()
    run = await drive()
    spent = cpu.role_between(before, worker.cpu())
    worker.check_path()
    n = len(run.latencies_ms)
    by_role = {role: (user * 1000 / n, system * 1000 / n) for role, (user, system) in spent.items()}
    return Throughput(run.per_s, summarize(run.latencies_ms), by_role, sorted(run.layers))


def node_starts(node: str, count: int) -> tuple[float, float]:
    """Median CPU (user + system, from wait4) and wall time in ms of one bare `node -e 0`,
    with a step's environment, as the spawn scenario's baselines run."""
    cpu_ms, wall_ms = [], []
    for _ in range(count):
        started = time.perf_counter()
        process = subprocess.Popen(
            [node, "-e", "0"],
            env=FRESH_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall_ms.append((time.perf_counter() - started) * 1000)
        if process.returncode != 0:
            raise RuntimeError(f"node -e 0 exited {process.returncode}")
        cpu_ms.append((usage.ru_utime + usage.ru_stime) * 1000)
    return statistics.median(cpu_ms), statistics.median(wall_ms)


# --- the comparison -------------------------------------------------------------------------


async def repetition(
    workers: list[Worker], node: str, index: int, args: argparse.Namespace
) -> Repetition:
    found = Repetition({}, {}, 0.0, 0.0)

    def measure_rate(worker: Worker, runtime: Runtime) -> Callable[[], Awaitable[str]]:
        async def go() -> str:
            is_exec_js = worker.path == "exec" and runtime == "node"
            count = args.exec_steps if is_exec_js else args.steps
            # A node start per step: a tenth of the measured ones warm the worker up enough.
            warmup = min(args.warmup, max(1, count // 10)) if is_exec_js else args.warmup
            got = await throughput(worker, runtime, count, warmup, args)
            found.throughput[f"{worker.path}-{runtime}"] = got
            return f"{worker.path} {runtime}: {got.per_s:.0f}/s, {got.cpu_ms_total:.1f} ms CPU"

        return go

    def measure_chain(worker: Worker) -> Callable[[], Awaitable[str]]:
        async def go() -> str:
            count = args.chain_steps if worker.path == "fork" else args.exec_chain_steps
            got = await chain(worker, count, args)
            found.chains[worker.path] = got
            return f"{worker.path} chain: p50 {report.ms(got.latency.p50)} ms"

        return go

    async def measure_node() -> str:
        found.node_cpu_ms, found.node_wall_ms = await asyncio.to_thread(
            node_starts, node, args.node_starts
        )
        return f"node -e 0: {found.node_cpu_ms:.1f} ms CPU, {found.node_wall_ms:.1f} ms"

    cases: list[Callable[[], Awaitable[str]]] = [measure_node]
    for worker in workers:
        cases += [measure_rate(worker, "node"), measure_rate(worker, "python")]
        cases.append(measure_chain(worker))
    shift = index % len(cases)
    for case in cases[shift:] + cases[:shift]:
        line = await case()
        print(f"repetition {index + 1}/{args.repeat} {line}", file=sys.stderr, flush=True)
    return found


async def soak(worker: Worker, args: argparse.Namespace) -> tuple[list[SoakSample], set[str]]:
    """`--soak` executions in `--soak-samples` chunks, RSS read after the warm-up and after
    each chunk; the node zygote is checked to be the same process at every reading."""
    chunks = max(1, min(args.soak_samples, args.soak))
    done = 0
    layers: set[str] = set()

    def sample(per_s: float, cpu_ms: float) -> SoakSample:
        worker.check_path()
        return SoakSample(done, per_s, cpu_ms, tree_memory(worker.pid))

    if args.warmup:
        await throughput(worker, "node", args.warmup, 0, args)
    samples = [sample(0.0, 0.0)]
    for chunk in range(chunks):
        count = args.soak * (chunk + 1) // chunks - done
        got = await throughput(worker, "node", count, 0, args)
        done += got.latency.n
        layers |= set(got.layers)
        samples.append(sample(got.per_s, got.cpu_ms_total))
        memory = samples[-1].memory
        print(
            f"soak {done}/{args.soak}: {got.per_s:.0f}/s, worker {memory.worker_mib:.1f} MiB, "
            f"zygote {memory.zygote_mib:.1f}, node zygote {memory.node_zygote_mib:.1f}, "
            f"{memory.zygote_children} under the zygote",
            file=sys.stderr,
            flush=True,
        )
    return samples, layers


@dataclass
class Outcome:
    paths: list[JsPath]
    repetitions: list[Repetition] = field(default_factory=list)
    soak: list[SoakSample] = field(default_factory=list)
    soak_layers: set[str] = field(default_factory=set)
    node_zygotes: dict[str, int | None] = field(default_factory=dict)


async def measure(args: argparse.Namespace, node: str) -> Outcome:
    outcome = Outcome(_paths(args))
    async with contextlib.AsyncExitStack() as stack:
        workers = []
        for index, path in enumerate(outcome.paths):
            fleet = await stack.enter_async_context(Fleet(1, _options(args, index, path)))
            workers.append(Worker(path, fleet))
        for worker in workers:
            worker.check_path()
            outcome.node_zygotes[worker.path] = worker.node_zygote_pid
        if args.soak:
            outcome.soak, outcome.soak_layers = await soak(workers[0], args)
            return outcome
        for index in range(args.repeat):
            outcome.repetitions.append(await repetition(workers, node, index, args))
    return outcome


def run(args: argparse.Namespace, command: str) -> int:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("bench js: node not found")
    if args.soak < 0 or args.soak_samples < 1 or min(args.exec_steps, args.chain_steps) < 1:
        raise SystemExit("bench js: --soak >= 0; --soak-samples and the step counts >= 1")
    outcome: Outcome = run_loop(measure(args, node), args.loop)
    layers = js_report.layers(outcome.repetitions, sorted(outcome.soak_layers))
    info = report.machine_info(layers, args.loop, node)
    if outcome.soak:
        body, judged = js_report.soak_body(outcome.soak, args.soak)
    else:
        body, judged = js_report.comparison_body(outcome.repetitions, outcome.paths)
    print(report.document(f"## js: {HELP}", command, info, body) if args.markdown else body)
    if args.json:
        report.write_json(
            args.json,
            {
                "scenario": "js",
                "command": command,
                "machine": info,
                "config": report.config(args),
                "paths": outcome.paths,
                "node_zygote_pids": outcome.node_zygotes,
                "repetitions": outcome.repetitions,
                "aggregate": js_report.aggregates(outcome.repetitions),
                "ratios": js_report.ratios(outcome.repetitions),
                "soak": outcome.soak,
                "targets": judged,
            },
        )
    return 0
