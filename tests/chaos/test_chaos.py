"""Chaos: three `runnerd serve` workers on one stream of a durable Redis, a mix of executions
(multi-step Python and JavaScript, retried, failing, slow, hostile, for_each loops inline and
distributed), and while they run: workers
SIGKILLed and replaced, one drained with SIGTERM, the workers' Redis connections cut, Redis
paused, and Redis itself killed and restarted from its AOF. Then every execution must have
exactly one result with the status its kind calls for, nothing may be left pending or delayed,
no step the checkpoints had passed may have run again without a run of its execution to explain
it, no loop item may have run again without a log line to explain it, and nothing may be left
behind: processes, fds, memory, keys.

The reduced run is part of the normal suite; the full one (2,000 executions) is marked slow:

    .venv/bin/pytest -m slow tests/chaos/test_chaos.py::test_chaos_full -s
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from runnerd.client import Client, Result
from runnerd.keys import GROUP, Keys
from runnerd.messages import Integration
from runnerd.spawner import POOL_KINDS_MAX
from tests.chaos.conftest import (
    COUNTING_STEP,
    TEST_CLIENT_NAME,
    DurableRedis,
    Fleet,
    log_records,
    still_running,
    stray_processes,
    zombies_under,
)
from tests.runnerd.conftest import ServeFactory, wait_for

WORKERS = 3
WORKER_SETTINGS: dict[str, Any] = {
    "claim_idle_s": 2,
    "max_deliveries": 5,
    "concurrency": 6,
    "drain_s": 3,
    "retry_base_s": 0.2,
    "retry_max_s": 1,
}
CUT_FOR_S = 3.0  # connection kills repeat for this long
PAUSE_MS = 3000  # longer than claim_idle_s: entries look idle when Redis comes back
SETTLE_S = 5.0
FDS_PER_WARM_CHILD = 4  # its step channel, stdout and stderr pipes, and a pidfd at most
FDS_MARGIN = 8
RSS_MARGIN_BYTES = 64 * 1024 * 1024  # code cache, allocator arenas, metrics histograms
RUN_LINE = re.compile(r"execution (\S+) attempt (\d+) from step (\d+) \(delivery (\d+)\)")
# A distributed loop's items: each fan-out puts one entry per item on the stream, and each run
# of an item beyond its entry's first delivery is said in one of these two lines.
FAN_OUT_LINE = re.compile(r"loop each handed \d+ items to the work streams.*")
ITEM_AGAIN_LINE = re.compile(r"loop each item (\d+) (?:runs again|delivered again).*")
LOOP_ITEMS = 6
ITEM_SLEEP_S = 0.3


@dataclass(frozen=True)
class Scale:
    executions: int
    wave: int  # executions submitted at a time, every WAVE_EVERY_S
    kill_every_s: float
    results_timeout_s: float


WAVE_EVERY_S = 2.0
REDUCED = Scale(executions=200, wave=40, kill_every_s=4.0, results_timeout_s=90)
FULL = Scale(executions=2000, wave=60, kill_every_s=5.0, results_timeout_s=600)


# --- the kinds of execution ------------------------------------------------------------------


def counting(name: str) -> dict[str, Any]:
    return {"name": name, "code": str(COUNTING_STEP), "network": True}


def each(distribute: bool) -> dict[str, Any]:
    """A loop over the input's `items`, each item through a counting step (`each[i].ic`)."""
    loop = {"items": "items", "parallelism": 3, "distribute": distribute, "steps": [counting("ic")]}
    return {"name": "each", "for_each": loop}


def inline(name: str, source: str, runtime: str = "python", **limits: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"name": name, "source": source, "runtime": runtime}
    if limits:
        step["limits"] = limits
    return step


SHAPE_JS = 'export function run(i, ctx) { return { ...i, trail: [...i.trail, "shape"] }; }'
FORK_BOMB = "import os\ndef run(input, ctx):\n    while True:\n        os.fork()\n"
MEMORY_HOG = (
    "def run(input, ctx):\n    held = []\n    for _ in range(256):\n"
    "        held.append(bytearray(1024 * 1024))\n    return len(held)\n"
)
FD3_GARBAGE = "import os\ndef run(input, ctx):\n    os.write(3, b'\\xc1' * 64)\n    return 1\n"
CPU_SPIN = "def run(input, ctx):\n    while True:\n        pass\n"


@dataclass(frozen=True)
class Kind:
    name: str
    weight: int
    steps: list[dict[str, Any]]
    status: str = "succeeded"
    options: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    attempts: int = 1
    error_types: frozenset[str] = frozenset()
    failed_step: str | None = None
    runs: dict[str, int] = field(default_factory=dict)  # counting steps' runs without faults
    items: int = 0  # a loop's items (its input's `items`), each through a counting step
    distributed: bool = False

    def integration(self) -> Integration:
        return Integration.from_dict(
            {"name": self.name, "retries": self.retries, "steps": self.steps}
        )

    @property
    def trail(self) -> list[str]:
        return [step["name"] for step in self.steps]

    @property
    def runs_logged(self) -> int:
        """Runs of the execution its workers log when no fault hits it: a distributed loop's
        execution is run once more, to continue after its last item."""
        return self.attempts * (2 if self.distributed else 1)

    def counted_steps(self) -> dict[str, int]:
        """Counting step name -> its index in the integration."""
        return {step["name"]: index for index, step in enumerate(self.steps) if "code" in step}


KINDS = [
    Kind("chain", 28, [counting("c1"), counting("c2"), counting("c3")]),
    Kind("mixed", 20, [counting("c1"), inline("shape", SHAPE_JS, "node"), counting("c2")]),
    Kind(
        "retried",
        12,
        [counting("c1"), counting("c2")],
        options={"fail_on_attempt": {"c2": 1}},
        retries=2,
        attempts=2,
        runs={"c2": 2},
    ),
    Kind(
        "failing",
        8,
        [counting("c1"), counting("c2")],
        status="failed",
        options={"fail": ["c2"]},
        retries=1,
        attempts=2,
        error_types=frozenset({"exception"}),
        failed_step="c2",
        runs={"c2": 2},
    ),
    Kind("loop", 5, [counting("c1"), each(False)], items=LOOP_ITEMS),
    Kind("distributed", 5, [counting("c1"), each(True)], items=LOOP_ITEMS, distributed=True),
    Kind("slow", 12, [counting("c1"), counting("c2")], options={"sleep_s": {"c1": 1.0}}),
    # What the hostile suite accepts for a fork bomb: whichever copy answers first.
    Kind(
        "fork_bomb",
        5,
        [counting("c1"), inline("bomb", FORK_BOMB, pids=16, wall_s=10)],
        status="failed",
        error_types=frozenset({"exception", "protocol", "killed"}),
        failed_step="bomb",
    ),
    Kind(
        "memory",
        5,
        [counting("c1"), inline("hog", MEMORY_HOG, memory_mb=64)],
        status="failed",
        error_types=frozenset({"memory"}),
        failed_step="hog",
    ),
    Kind(
        "fd3_garbage",
        5,
        [counting("c1"), inline("garbage", FD3_GARBAGE)],
        status="failed",
        error_types=frozenset({"protocol"}),
        failed_step="garbage",
    ),
    # The CPU limit, or on a host busy enough that 2 CPU seconds take longer than 5 s of wall
    # clock, the wall clock: either way a limit ended the step alone. A short wall limit also
    # keeps the step from outliving several worker kills in a row (each a delivery).
    Kind(
        "cpu_spin",
        5,
        [counting("c1"), inline("spin", CPU_SPIN, cpu_s=1, wall_s=5)],
        status="failed",
        error_types=frozenset({"cpu", "timeout"}),
        failed_step="spin",
    ),
]


# --- the run -----------------------------------------------------------------------------------


class InFlight:
    """One Client, on a loop thread of its own, through the whole run: every execution is
    awaited from its submit on, so all the waits are in flight at once while the faults hit
    (its connections are cut, paused and restarted with the workers')."""

    def __init__(self, url: str, prefix: str, wait_s: float) -> None:
        self.wait_s = wait_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = Client.connect(url, prefix)
        self._call(self.client.open())
        self.waits: dict[str, concurrent.futures.Future[Result]] = {}

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def submit(self, integration: Integration, data: Any, execution_id: str) -> None:
        """Submit, then await it from now on. A lost reply is the client's to retry."""
        self._call(self.client.submit(integration, data, execution_id=execution_id))
        waiting = self.client.wait(execution_id, self.wait_s)
        self.waits[execution_id] = asyncio.run_coroutine_threadsafe(waiting, self.loop)

    def results(self) -> dict[str, Result]:
        return {i: wait.result(timeout=self.wait_s) for i, wait in self.waits.items()}

    def close(self) -> None:
        for wait in self.waits.values():
            wait.cancel()
        self._call(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Chaos:
    scale: Scale
    redis: DurableRedis
    fleet: Fleet
    prefix: str
    rng: random.Random
    keys: Keys = field(init=False)
    kinds: dict[str, Kind] = field(default_factory=dict)  # execution id -> kind
    faults: Counter[str] = field(default_factory=Counter)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.keys = Keys(self.prefix, 1)
        self.integrations = {kind.name: kind.integration() for kind in KINDS}
        waves = -(-self.scale.executions // self.scale.wave)
        wait_s = waves * WAVE_EVERY_S + self.scale.results_timeout_s
        self.in_flight = InFlight(self.redis.url, self.prefix, wait_s)

    def note(self, what: str) -> None:
        self.faults[what.split()[0]] += 1
        self.timeline.append((round(time.monotonic() - self.started, 1), what))

    # Submitting survives the faults too: a submit whose reply was lost is sent again by the
    # client with the same execution id (a duplicate entry of one execution, which must still
    # end in one result).
    def submit_wave(self, count: int) -> None:
        for _ in range(count):
            kind = self.rng.choices(KINDS, weights=[k.weight for k in KINDS])[0]
            execution_id = self.keys.new_execution_id(0)
            data = {
                "redis_port": self.redis.port,
                "counters": f"chaosruns:{execution_id}",
                "trail": [],
                **kind.options,
            }
            if kind.items:
                item = {key: data[key] for key in ("redis_port", "counters", "trail")}
                # Slow enough items that the faults find loops with items in flight.
                data["items"] = [
                    {**item, "n": n, "sleep_s": {f"each[{n}].ic": ITEM_SLEEP_S}}
                    for n in range(kind.items)
                ]
            self.kinds[execution_id] = kind
            self.in_flight.submit(self.integrations[kind.name], data, execution_id)

    def kill_one(self) -> None:
        victim = self.rng.choice(self.fleet.alive())
        self.fleet.kill(victim)
        self.note(f"sigkill {victim.daemon.worker_id}")
        self.fleet.start()

    def drain_one(self) -> None:
        victim = self.rng.choice(self.fleet.alive())
        self.fleet.drain(victim)
        self.note(f"sigterm {victim.daemon.worker_id}")
        self.fleet.start()

    def cut_connections(self) -> None:
        """Kill every connection of the workers (not the steps' short ones, not the test's)
        again and again for CUT_FOR_S."""
        client = self.redis.client()
        killed = 0
        until = time.monotonic() + CUT_FOR_S
        while time.monotonic() < until:
            for info in client.client_list():
                if info.get("name") != TEST_CLIENT_NAME and int(info.get("age", 0)) >= 1:
                    with contextlib.suppress(redis.RedisError):
                        killed += int(client.client_kill_filter(_id=info["id"]))
            time.sleep(0.3)
        client.close()
        self.note(f"client-kill {killed} connections over {CUT_FOR_S:g} s")

    def pause_redis(self) -> None:
        client = self.redis.client()
        client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        client.close()
        self.note(f"client-pause {PAUSE_MS} ms")
        time.sleep(PAUSE_MS / 1000)

    def restart_redis(self) -> None:
        began = time.monotonic()
        self.redis.restart()
        self.note(f"redis-restart (down {time.monotonic() - began:.1f} s)")

    def run(self) -> None:
        waves = -(-self.scale.executions // self.scale.wave)
        period_s = waves * WAVE_EVERY_S
        one_offs = [
            (0.2 * period_s, self.drain_one),
            (0.4 * period_s, self.cut_connections),
            (0.6 * period_s, self.pause_redis),
            (0.8 * period_s, self.restart_redis),
        ]
        submitted = 0
        next_wave = 0.0
        next_kill = self.scale.kill_every_s
        while submitted < self.scale.executions or one_offs:
            now = time.monotonic() - self.started
            if submitted < self.scale.executions and now >= next_wave:
                count = min(self.scale.wave, self.scale.executions - submitted)
                self.submit_wave(count)
                submitted += count
                next_wave += WAVE_EVERY_S
            if one_offs and now >= one_offs[0][0]:
                one_offs.pop(0)[1]()
            if now >= next_kill:
                self.kill_one()
                next_kill = time.monotonic() - self.started + self.scale.kill_every_s
            time.sleep(0.05)

    def wait_results(self) -> dict[str, Result]:
        client = self.redis.client()
        ids = list(self.kinds)

        def missing() -> list[str]:
            values = client.mget([self.keys.result(i) for i in ids])
            return [i for i, value in zip(ids, values, strict=True) if value is None]

        deadline = time.monotonic() + self.scale.results_timeout_s
        left = missing()
        while left and time.monotonic() < deadline:
            time.sleep(1)
            left = missing()
        client.close()
        assert not left, f"{len(left)} execution(s) without a result, e.g. {left[:3]}"
        # Every wait, in flight since its submit, ends with that result: none was lost to a
        # fault, none surfaced an error.
        return self.in_flight.results()


# --- the checks --------------------------------------------------------------------------------


def evidence(fleet: Fleet, execution_id: str) -> list[str]:
    """Every worker's log lines about one execution: printed when it ended wrongly, since the
    logs do not outlive the test's temporary directory."""
    return [
        f"{member.daemon.worker_id} ({member.fate}): {record['msg']}"
        for member in fleet.members
        for record in log_records(member)
        if record.get("execution_id") == execution_id
    ]


def check_outcomes(chaos: Chaos, results: dict[str, Result]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for execution_id, kind in chaos.kinds.items():
        result = results[execution_id]
        where: Any = (kind.name, execution_id, result.status, result.error, result.failed_step)
        if result.status != kind.status:
            where = (where, evidence(chaos.fleet, execution_id), chaos.timeline)
        assert result.status == kind.status, where
        assert result.attempts == kind.attempts, (where, result.attempts)
        if kind.items:
            assert [item["n"] for item in result.output] == list(range(kind.items)), where
            trails = [item["trail"] for item in result.output]
            assert trails == [[f"each[{n}].ic"] for n in range(kind.items)], (where, trails)
            counts = result.steps[-1].items
            assert counts is not None and counts.succeeded == kind.items, (where, counts)
        elif kind.status == "succeeded":
            assert result.output["trail"] == kind.trail, where
        else:
            assert result.error is not None and result.error.type in kind.error_types, where
            assert result.failed_step == kind.failed_step, where
        outcomes[f"{kind.name}: {result.status}"] += 1
    return outcomes


def runs_of_executions(fleet: Fleet) -> dict[str, list[int]]:
    """Execution id -> the first step of each run of it, from every worker's log (the line is
    written, and flushed, before the run's first step starts, so a killed worker's runs count)."""
    starts: dict[str, list[int]] = {}
    for member in fleet.members:
        for record in log_records(member):
            found = RUN_LINE.fullmatch(record.get("msg", ""))
            if found:
                starts.setdefault(found.group(1), []).append(int(found.group(3)))
    return starts


def loop_lines(fleet: Fleet) -> tuple[Counter[str], Counter[tuple[str, int]]]:
    """From every worker's log: each execution's fan-outs, and each item's runs said again."""
    fan_outs: Counter[str] = Counter()
    again: Counter[tuple[str, int]] = Counter()
    for member in fleet.members:
        for record in log_records(member):
            message, execution_id = record.get("msg", ""), record.get("execution_id", "")
            if FAN_OUT_LINE.fullmatch(message):
                fan_outs[execution_id] += 1
            elif found := ITEM_AGAIN_LINE.fullmatch(message):
                again[(execution_id, int(found.group(1)))] += 1
    return fan_outs, again


END_LINE = re.compile(r"execution \S.* in [\d.]+ ms")


def overlapping_runs(fleet: Fleet) -> Counter[str]:
    """Execution id -> its runs that began while another worker's run of it was still going
    (Redis stalled past the claim time, so a live worker's entry looked idle). Only such a run
    can start an item the other one is starting too, before either has said so. A run lasts
    from its run line to its worker's next line that ends it (an end line, or a new run line
    after a lost connection); one that never ended was its worker's last (killed)."""
    spans: dict[str, list[tuple[str, float, float]]] = {}
    for member in fleet.members:
        open_runs: dict[str, float] = {}
        for record in log_records(member):
            message, execution_id = record.get("msg", ""), record.get("execution_id")
            if execution_id is None:
                continue
            ended = END_LINE.fullmatch(message) or RUN_LINE.fullmatch(message)
            if ended and execution_id in open_runs:
                began = open_runs.pop(execution_id)
                spans.setdefault(execution_id, []).append(
                    (member.daemon.worker_id, began, record["ts"])
                )
            if RUN_LINE.fullmatch(message):
                open_runs[execution_id] = record["ts"]
        for execution_id, began in open_runs.items():
            spans.setdefault(execution_id, []).append((member.daemon.worker_id, began, began))
    found: Counter[str] = Counter()
    for execution_id, runs in spans.items():
        for worker, began, _ in runs:
            if any(w != worker and b < began < e for w, b, e in runs):
                found[execution_id] += 1
    return found


def check_item_runs(
    chaos: Chaos, kind: Kind, execution_id: str, firsts: list[int], lines: Any
) -> int:
    """Every item ran, and no more often than the logs explain. An inline loop runs each item
    at most once per run of its execution that reached the loop (a run that takes the loop
    over keeps the finished items). A distributed item runs once per entry of it on the
    stream (one per fan-out), and again only on a redelivery, which its worker says. An
    inline item runs again only when its worker was lost while it ran, which the worker that
    runs it again says, or when two runs of the execution overlapped."""
    fan_outs, again, overlaps = lines
    client = chaos.redis.client()
    pipe = client.pipeline(transaction=False)
    for n in range(kind.items):
        pipe.scard(f"chaosruns:{execution_id}:each[{n}].ic")
    runs = pipe.execute()
    client.close()
    loop_at = len(kind.steps) - 1
    for n, count in enumerate(runs):
        if kind.distributed:
            explained = fan_outs[execution_id] + again[(execution_id, n)]
        else:
            reached = sum(1 for first in firsts if first <= loop_at)
            explained = min(reached, 1 + again[(execution_id, n)] + overlaps[execution_id])
        assert 1 <= count <= explained, (kind.name, execution_id, n, runs, firsts, explained)
    return sum(runs) - kind.items


def check_step_runs(chaos: Chaos, fleet: Fleet) -> dict[str, int]:
    """A counting step may run again only when a run of its execution started at or before it:
    a resumed run starts at its checkpoint, so the steps the checkpoint had passed stay run once.
    An execution that was never run again beyond its attempts ran each step exactly as often as
    its kind says."""
    starts = runs_of_executions(fleet)
    lines = (*loop_lines(fleet), overlapping_runs(fleet))
    client = chaos.redis.client()
    figures = Counter({"executions run again": 0, "step runs repeated": 0, "item runs repeated": 0})
    for execution_id, kind in chaos.kinds.items():
        steps = kind.counted_steps()
        pipe = client.pipeline(transaction=False)
        for name in steps:
            pipe.scard(f"chaosruns:{execution_id}:{name}")  # a run is a token in a set
        runs = dict(zip(steps, pipe.execute(), strict=True))
        firsts = starts.get(execution_id, [])
        for name, index in steps.items():
            explained = sum(1 for first in firsts if first <= index)
            assert 1 <= runs[name] <= explained, (kind.name, execution_id, name, runs, firsts)
        if kind.items:
            figures["item runs repeated"] += check_item_runs(
                chaos, kind, execution_id, firsts, lines
            )
        expected = {name: kind.runs.get(name, 1) for name in steps}
        if len(firsts) == kind.runs_logged:
            assert runs == expected, (kind.name, execution_id, runs, firsts)
        else:
            figures["executions run again"] += 1
            figures["step runs repeated"] += sum(runs.values()) - sum(expected.values())
    client.close()
    return dict(figures)


def check_redis_state(chaos: Chaos) -> dict[str, int]:
    """Nothing pending, nothing delayed, no dead letters; of the prefix's keys only results,
    submitted markers and integrations (with TTLs), the work, dead and completions streams
    (the last trimmed by age) and the workers' registry (pruned by its writers)."""
    client = chaos.redis.client()
    keys = chaos.keys
    assert client.xpending(keys.work(0), GROUP)["pending"] == 0
    assert client.xlen(keys.work(0)) == 0
    assert client.zcard(keys.delayed(0)) == 0
    assert client.xlen(keys.dead(0)) == 0, client.xrange(keys.dead(0), count=3)
    kinds: Counter[str] = Counter()
    for raw in client.scan_iter(match=f"{keys.tag(0)}:*", count=1000):
        name = raw.decode()
        kind = name.removeprefix(f"{keys.tag(0)}:").split(":")[0]
        kinds[kind] += 1
        if kind in ("work", "dead", "completions", "workers"):
            continue
        # submitted: an id's marker against a second enqueue, kept as long as its result.
        # A loop's state is deleted when its execution ends; a late duplicate run of the
        # execution (a redelivery) may write some again, which then expires as a result does.
        allowed = ("result", "integration", "submitted", "loop", "items", "loops")
        assert kind in allowed, f"leftover key {name}"
        assert client.pttl(name) > 0, f"{name} has no TTL"
    client.close()
    return dict(kinds)


def check_metrics(chaos: Chaos, fleet: Fleet, results: dict[str, Result]) -> dict[str, Any]:
    """Compare /metrics with the results, for the workers that lived to the end only: a killed
    worker's counters died with it, and a drained one exited; the results say which worker wrote
    each. A worker counts every execution it ended, including a duplicate whose result another
    worker had written first (it acks and counts, the result stays), so its count may exceed the
    results that name it, by no more than the duplicate runs the logs show."""
    written = Counter((r.raw.worker, r.status) for r in results.values())
    figures: dict[str, Any] = {}
    for member in fleet.alive():
        samples = member.metrics()
        worker_id = member.daemon.worker_id
        for status in ("succeeded", "failed", "dead"):
            counted = samples.get(f'runnerd_executions_finished_total{{status="{status}"}}', 0)
            assert counted >= written[(worker_id, status)], (worker_id, status, counted)
            figures[f"{worker_id} {status}"] = (int(counted), written[(worker_id, status)])
        assert samples.get('runnerd_executions_finished_total{status="error"}', 0) == 0
        # One series per reason now: all of them zero (and there are some to look at).
        dead = [v for name, v in samples.items() if name.startswith("runnerd_dead_lettered_total")]
        assert dead and sum(dead) == 0
    return figures


def check_hygiene(fleet: Fleet) -> dict[str, Any]:
    time.sleep(SETTLE_S)
    # Processes of the step uids: only the warm children of the live workers, waiting for a
    # step (one per kind of step and worker), may be left.
    live = {member.daemon.pid: member for member in fleet.alive()}
    warm: Counter[int] = Counter()
    strays = []
    for process in stray_processes(fleet.uids()):
        owner = next((p.pid for p in process.parents() if p.pid in live), None)
        if owner is None:
            strays.append(process)
        else:
            warm[owner] += 1
    assert not strays, [(p.pid, p.info, p.cmdline()) for p in strays]
    assert all(count <= POOL_KINDS_MAX for count in warm.values()), warm
    assert not zombies_under(os.getpid())
    for member in fleet.members:
        if member.fate != "alive":
            assert not still_running(member.zygotes), (member.daemon.worker_id, member.zygotes)
    usage = {}
    for member in fleet.alive():
        now = member.usage()
        usage[member.daemon.worker_id] = (member.baseline, now)
        # A warm child's channel and pipes are held for it until its step: not a leak.
        allowed = member.baseline["fds"] + FDS_PER_WARM_CHILD * warm[member.daemon.pid]
        assert now["fds"] <= allowed + FDS_MARGIN, (usage, warm)
        assert now["rss"] <= member.baseline["rss"] + RSS_MARGIN_BYTES, usage
    return usage


def still_serving(chaos: Chaos, fleet: Fleet) -> None:
    """No worker wedged: each answers /readyz and the fleet takes new work at once."""
    for member in fleet.alive():
        wait_for(lambda m=member: m.ready() == 200, 15, f"{member.daemon.worker_id} ready")
    integration = KINDS[0].integration()

    async def go() -> list[Result]:
        async with Client.connect(chaos.redis.url, chaos.prefix) as client:
            data = {"redis_port": chaos.redis.port, "counters": "chaosruns:after", "trail": []}
            ids = [await client.submit(integration, data) for _ in range(3 * len(fleet.alive()))]
            return [await client.wait(i, 30) for i in ids]

    assert [r.status for r in asyncio.run(go())] == ["succeeded"] * 3 * len(fleet.alive())


def run_scenario(
    scale: Scale, serve: ServeFactory, durable_redis: DurableRedis, prefix: str
) -> dict[str, Any]:
    fleet = Fleet(serve, durable_redis.url, **WORKER_SETTINGS)
    for _ in range(WORKERS):
        fleet.start()
    chaos = Chaos(scale, durable_redis, fleet, prefix, random.Random())
    began = time.monotonic()
    try:
        chaos.run()
        results = chaos.wait_results()
    finally:
        chaos.in_flight.close()
    took_s = time.monotonic() - began
    for member in fleet.members:
        if member.fate == "drained":
            assert member.daemon.wait(30) == 0, member.daemon.log()[-2000:]
    report: dict[str, Any] = {
        "executions": len(chaos.kinds),
        "workers started": len(fleet.members),
        "faults": dict(chaos.faults),
        "timeline": chaos.timeline,
        "duration_s": round(took_s, 1),
        "outcomes": dict(sorted(check_outcomes(chaos, results).items())),
        "step runs": check_step_runs(chaos, fleet),
        "metrics (counted, results naming the worker)": check_metrics(chaos, fleet, results),
    }
    still_serving(chaos, fleet)
    report["redis keys"] = check_redis_state(chaos)
    report["usage (start, end)"] = check_hygiene(fleet)
    print("\nchaos report:")
    for name, value in report.items():
        print(f"  {name}: {value}")
    return report


@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_chaos_reduced(
    serve: ServeFactory, durable_redis: DurableRedis, prefix: str, tmp_path: Path
) -> None:
    run_scenario(REDUCED, serve, durable_redis, prefix)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chaos_full(
    serve: ServeFactory, durable_redis: DurableRedis, prefix: str, tmp_path: Path
) -> None:
    run_scenario(FULL, serve, durable_redis, prefix)
