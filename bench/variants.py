"""Ways of running the same trivial step, each timed one step at a time by the scenarios.

The step returns its input's `n` back, so every result is checked to be the step's own (a
stale or cached answer would fail). `Fresh` starts a new process per step (a plain
interpreter, or one under bwrap); `Runnerd` goes through runnerd's Spawner, cold or with a
warm pool, its JavaScript steps forked from the node zygote or exec'ing a node each, as its
options say.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from runnerd.spawner import Spawner, StepSpec
from runnerd.zygote_link import SandboxOptions
from sandbox.protocol import Runtime

PY_STEP = "def run(input, ctx):\n    return {'ok': True, 'n': input['n']}\n"
JS_STEP = "export function run(input, ctx) {\n  return { ok: true, n: input.n };\n}\n"
# The same step for a fresh interpreter: input from argv, output printed as JSON.
PY_ONE_SHOT = f"import json, sys\n{PY_STEP}print(json.dumps(run(json.loads(sys.argv[1]), None)))\n"
JS_ONE_SHOT = (
    JS_STEP.removeprefix("export ")
    + "process.stdout.write(JSON.stringify(run(JSON.parse(process.argv[1]), {})));\n"
)
# The environment a fresh process gets: what a step gets, nothing of the caller's. An inherited
# one can cost the baseline start-up work the steps never do (NODE_EXTRA_CA_CERTS, set on many
# CI machines, makes every node parse a CA bundle: ~40 ms here).
FRESH_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# bwrap with the isolation it is compared at: every namespace it can unshare, a read-only
# root, private /tmp, /proc and /dev, and no outliving the caller.
BWRAP = (
    "bwrap",
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--tmpfs",
    "/tmp",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
)


class StepFailed(Exception):
    """A step did not return its own input back: the figures would mean nothing."""


def _expect(n: int, got: object, detail: str) -> None:
    if got != {"ok": True, "n": n}:
        raise StepFailed(f"step {n} returned {got!r} {detail}".strip())


@dataclass
class Variant:
    """One way of running the step, and how steps arrive at it."""

    key: str
    label: str
    runtime: Runtime
    rate_per_s: float = 0.0  # 0: back-to-back
    prime: int = 0  # unmeasured steps run once after start, before the warmup
    baselines: tuple[str, ...] = ()  # keys of the variants its p50 is compared with

    async def start(self) -> None:
        pass

    async def run_one(self, n: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


@dataclass
class Fresh(Variant):
    """A new process per step, started the usual way (fork + exec from asyncio)."""

    argv: Sequence[str] = ()

    async def run_one(self, n: int) -> None:
        process = await asyncio.create_subprocess_exec(
            *self.argv,
            json.dumps({"n": n}),
            stdin=asyncio.subprocess.DEVNULL,
            env=FRESH_ENV,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise StepFailed(f"{self.argv[0]} exited {process.returncode}: {err.decode()[-500:]}")
        _expect(n, json.loads(out), "")


@dataclass
class Runnerd(Variant):
    """Through runnerd's Spawner: a child forked from the zygote and confined by every layer
    the host allows; with `pool_size` > 0, taken from a warm pool of such children."""

    options: SandboxOptions = field(default_factory=SandboxOptions)
    pool_size: int = 0
    layers: list[str] = field(default_factory=list)  # as the children reported them
    _spawner: Spawner | None = None

    async def start(self) -> None:
        self._spawner = await Spawner.start(self.options, pool_size=self.pool_size)
        capabilities = self._spawner.capabilities
        if self.runtime == "node" and capabilities.node_forked != self.options.node_fork:
            # A variant on the other path than its label says would measure the wrong thing.
            await self.close()
            path = "forked" if capabilities.node_forked else "exec'd per step"
            raise StepFailed(
                f"{self.key}: JavaScript steps are {path} here, against node_fork="
                f"{self.options.node_fork} ({capabilities.node_fork_note or 'no reason given'})"
            )

    async def run_one(self, n: int) -> None:
        assert self._spawner is not None, "start() first"
        source, filename = (
            (PY_STEP, "step.py") if self.runtime == "python" else (JS_STEP, "step.mjs")
        )
        step = StepSpec(self.runtime, filename, source, msgspec.msgpack.encode({"n": n}))
        outcome = await self._spawner.run_step(step)
        if not outcome.ok:
            raise StepFailed(f"step {n} failed: {outcome.error}")
        self.layers = outcome.layers
        _expect(n, msgspec.msgpack.decode(outcome.output), f"(layers {outcome.layers})")

    async def close(self) -> None:
        if self._spawner is not None:
            await self._spawner.close()
            self._spawner = None
