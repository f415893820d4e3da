"""What the rest of runnerd calls to run a step in the sandbox: `Spawner.run_step(StepSpec) ->
StepOutcome`, with warm pools of already-confined children per kind of step (runnerd/pool.py),
so that a step's latency is a frame round trip, not a fork and a confinement, and a cache of
compiled Python code. The zygote is reached through runnerd/zygote_link.py, each child through
runnerd/child_link.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec

from runnerd.bundle_cache import BundleCache, BundleUnavailable, Lease
from runnerd.child_link import Child, sandbox_failure
from runnerd.errors import SandboxUnavailable
from runnerd.messages import StepOutcome
from runnerd.metrics import Metrics
from runnerd.pool import WarmPool
from runnerd.zygote_link import EXIT_WAIT_S, SandboxOptions, Zygote
from sandbox.protocol import (
    Capabilities,
    Limits,
    Runtime,
    StepContext,
    StepError,
    StepRequest,
    StepResult,
)
from sandbox.rootfs import VIEW_BUNDLES

MB = 1024 * 1024
CODE_CACHE_BYTES_MAX = 64 * MB
POOL_KINDS_MAX = 8  # warm pools kept for this many (runtime, limits) kinds, least recent dropped


@dataclass(frozen=True)
class StepSpec:
    """One step to run: what the sandbox needs, nothing about executions or Redis."""

    runtime: Runtime
    filename: str
    source: str = ""
    input: bytes | msgspec.Raw = b"\xc0"  # one msgpack value (nil by default)
    limits: Limits = Limits()
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    context: StepContext = StepContext()
    bundle: str = ""  # the id of its dependency bundle, "" for none


class Spawner:
    """Runs steps in the sandbox. One per process; `start()` once, `close()` at the end."""

    def __init__(
        self,
        zygote: Zygote,
        pool_size: int,
        metrics: Metrics | None = None,
        bundles: BundleCache | None = None,
    ) -> None:
        self.zygote = zygote
        self.bundles = bundles
        self.metrics = metrics
        if metrics is not None:
            zygote.on_exit = lambda exited: metrics.child_exited(exited.pids_limited)
        self.pool_size = pool_size
        self._pools: OrderedDict[tuple[Runtime, Limits], WarmPool] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._code_cache: OrderedDict[str, bytes] = OrderedDict()
        self._code_cache_bytes = 0

    @classmethod
    async def start(
        cls,
        options: SandboxOptions,
        pool_size: int = 0,
        metrics: Metrics | None = None,
        bundles: BundleCache | None = None,
    ) -> Spawner:
        return cls(await Zygote.start(options), pool_size, metrics, bundles)

    @property
    def capabilities(self) -> Capabilities:
        return self.zygote.capabilities

    async def run_step(self, step: StepSpec) -> StepOutcome:
        if not step.bundle:
            return await self._run_step(step, "")
        lease = await self._bundle(step.bundle)
        if isinstance(lease, StepOutcome):
            return lease
        try:
            return await self._run_step(step, self._visible(lease))
        finally:
            lease.release()

    async def _bundle(self, bundle_id: str) -> Lease | StepOutcome:
        """The step's bundle, held against eviction while it runs; or its `bundle` error."""
        try:
            if self.bundles is None:
                raise BundleUnavailable("this worker has no bundle cache (see its start-up log)")
            return await self.bundles.acquire(bundle_id)
        except BundleUnavailable as exc:
            return StepOutcome(ok=False, error=StepError("bundle", str(exc)))

    def _visible(self, lease: Lease) -> str:
        """Where the step finds its bundle: in the view the cache is bound at VIEW_BUNDLES."""
        layers = self.capabilities.layers
        if "fs_view" in layers and layers["fs_view"].ok:
            return f"{VIEW_BUNDLES}/{os.path.basename(lease.path)}"
        return lease.path

    async def _run_step(self, step: StepSpec, bundle: str) -> StepOutcome:
        asked = time.perf_counter()
        child = await self._acquire(step.runtime, step.limits)
        if self.metrics is not None:
            self.metrics.spawn_duration.labels(step.runtime).observe(time.perf_counter() - asked)
        if isinstance(child, StepResult):
            return StepOutcome(ok=False, error=child.error)
        key = _code_key(step) if step.runtime == "python" else None
        cached = self._code_cache.get(key) if key else None
        request = StepRequest(
            filename=step.filename,
            source=step.source,
            input=step.input if isinstance(step.input, msgspec.Raw) else msgspec.Raw(step.input),
            context=step.context,
            env=step.env,
            argv=list(step.argv),
            code_cache=cached,
            want_code_cache=key is not None and cached is None,
            output_max=step.limits.output_mb * MB,
            bundle=bundle,
        )
        try:
            outcome, code_cache = await child.run(request)
        except asyncio.CancelledError:
            # An operator's cancel or a drain's hand-back: Child.run would leave the child
            # running, its channel and pipes open, until the zygote closes. Kill it now and
            # reap it, so its slot and uid are free before the caller goes on.
            await _shielded(self._abandon(child))
            raise
        if self.pool_size > 0:
            # Refill only now: a replacement started while the step runs competes with it.
            self._pool(step.runtime, step.limits).refill()
        if key and code_cache:
            self._remember_code(key, code_cache)
        return outcome

    async def _acquire(self, runtime: Runtime, limits: Limits) -> Child | StepResult:
        if self.pool_size > 0:
            child = self._pool(runtime, limits).take()
            if child is not None:
                return child
        return await self._spawn_ready(runtime, limits)

    async def _spawn_ready(self, runtime: Runtime, limits: Limits) -> Child | StepResult:
        try:
            new = await self.zygote.spawn(runtime, limits)
        except SandboxUnavailable as exc:
            return sandbox_failure(str(exc))
        child = await Child.attach(
            self.zygote, new.pid, limits, new.channel, new.stdout, new.stderr
        )
        child.uid = new.uid
        try:
            failure = await child.wait_ready(limits.wall_s)
        except asyncio.CancelledError:
            await _shielded(self._abandon(child))
            raise
        return failure if failure is not None else child

    async def _abandon(self, child: Child) -> None:
        pid = child.pid
        await child.discard()  # SIGKILL through the zygote; channel closed, pipes' readers ended
        if self.zygote.memory_watch is not None:
            self.zygote.memory_watch.remove(pid)
        await self.zygote.exited(pid, EXIT_WAIT_S)

    def _pool(self, runtime: Runtime, limits: Limits) -> WarmPool:
        key = (runtime, limits)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = WarmPool(lambda: self._warm(runtime, limits), self.pool_size)
            if len(self._pools) > POOL_KINDS_MAX:
                _, evicted = self._pools.popitem(last=False)
                self._closing.add(asyncio.create_task(evicted.close()))
        self._pools.move_to_end(key)
        return pool

    async def _warm(self, runtime: Runtime, limits: Limits) -> Child | None:
        child = await self._spawn_ready(runtime, limits)
        return child if isinstance(child, Child) else None

    def _remember_code(self, key: str, code: bytes) -> None:
        if len(code) > CODE_CACHE_BYTES_MAX // 8:
            return
        self._code_cache[key] = code
        self._code_cache_bytes += len(code)
        while self._code_cache_bytes > CODE_CACHE_BYTES_MAX:
            _, evicted = self._code_cache.popitem(last=False)
            self._code_cache_bytes -= len(evicted)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self.zygote.close()


async def _shielded(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run `cleanup` to its end even if the caller is cancelled again meanwhile."""
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise


def _code_key(step: StepSpec) -> str:
    # The fields as one msgpack array, so each is length-prefixed: hashed one after the other,
    # (source + "x", "y.py") and (source, "xy.py") shared a key, and a step whose name carried
    # the tail of another step's source was handed that step's compiled code.
    return hashlib.sha256(msgspec.msgpack.encode((step.source, step.filename))).hexdigest()
