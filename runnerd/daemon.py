"""`runnerd serve`: wiring and lifecycle of one worker.

    start: connect to Redis, create the consumer groups, start the sandbox (zygote + warm pool)
    run:   per partition, a reader that takes new entries while there is capacity (XREADGROUP
           BLOCK); a reclaimer that takes over entries of dead workers (XAUTOCLAIM); a promoter
           that moves due retries back to the stream; a heartbeat that keeps this worker's own
           in-flight entries from looking idle
    drain: on SIGTERM/SIGINT stop reading, let in-flight executions finish within drain_s, give
           the rest back to the group (another worker picks them up at once), exit 0

Beside them: the HTTP server (/healthz, /readyz, /metrics), a gauge loop reading the backlog
and the oldest entry's age from Redis every few seconds (so a scrape never waits on Redis),
and, when configured, the autoscaling signal as a CloudWatch EMF line on stdout. Two loops go
on through the drain: the cancel poll (an operator's cancel of an execution running here kills
its step) and the worker's announcement in the registry (`runnerd status`), removed at the end.
Every loop survives Redis errors: it logs, counts, backs off and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

import runnerd
from runnerd import emf, http, registry
from runnerd.bundle_cache import for_worker
from runnerd.bundle_store import RedisBundleStore
from runnerd.capacity import Capacity
from runnerd.connection import open_redis
from runnerd.errors import RunnerdError
from runnerd.executor import Ending, Executor, RetryPolicy
from runnerd.keys import Keys
from runnerd.messages import execution_decoder
from runnerd.metrics import Metrics
from runnerd.secret_source import SecretSource
from runnerd.settings import Settings
from runnerd.spawner import Spawner
from runnerd.store import Entry, RedisClient, Store
from runnerd.zygote_link import SandboxOptions

T = TypeVar("T")
log = logging.getLogger("runnerd.daemon")
READ_BLOCK_MS = 1000
BACKOFF_MAX_S = 5.0
GAUGE_INTERVAL_S = 5.0
CANCEL_WAIT_S = 5.0  # after the hand-back: how long cancelled executions may take to unwind
DEAD_LETTER_MAX_LEN = 100_000  # the dead-letter stream is trimmed (approximately) to this
CONSUMER_ACTIVE_MS = 15_000  # a consumer that read within this long counts as a live worker
LOOPS_STOP_S = READ_BLOCK_MS / 1000 + 2.0  # on drain: how long the loops may take to end
CANCEL_POLL_S = 0.5  # how often the cancel markers of in-flight executions are read
ANNOUNCE_INTERVAL_S = 5.0  # registry: readers keep workers seen within 15 s, three of these


class Worker:
    def __init__(
        self,
        config: Settings,
        redis: RedisClient,
        spawner: Spawner,
        metrics: Metrics,
        secrets: SecretSource | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.redis = redis
        self.spawner = spawner
        self.keys = Keys(config.key_prefix, config.partitions)
        self.store = Store(redis, self.keys, config.result_ttl_s)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.log = logging.LoggerAdapter(log, {"worker_id": self.worker_id})
        self.capacity = Capacity(config.concurrency)
        self.executor = Executor(
            self.store,
            spawner,
            self.worker_id,
            RetryPolicy(config.retry_base_s, config.retry_max_s),
            config.max_deliveries,
            DEAD_LETTER_MAX_LEN,
            metrics,
            self.capacity,
            config.loop_items_max,
            secrets,
        )
        self.in_flight: dict[tuple[int, bytes], tuple[Entry, asyncio.Task[None]]] = {}
        self.stopping = asyncio.Event()
        self.drained = asyncio.Event()  # set once nothing of this worker runs any more
        self.started_at = time.time()
        self.finished = 0
        capabilities = spawner.capabilities
        for layer, status in capabilities.layers.items():
            metrics.layers.labels(layer).set(1 if status.ok else 0)
        self.missing_layers = capabilities.missing(list(config.sandbox_require))
        metrics.set_in_flight(0, config.concurrency)

    @classmethod
    async def start(cls, config: Settings, secrets: SecretSource | None = None) -> Worker:
        metrics = Metrics(config.metrics_integration_label)
        redis = await open_redis(config.redis_url)
        try:
            bundles = for_worker(
                config, RedisBundleStore(redis, Keys(config.key_prefix, 1)), metrics
            )
            options = SandboxOptions.from_settings(config, str(bundles.root) if bundles else "")
            spawner = await Spawner.start(options, config.pool_size, metrics, bundles)
        except BaseException:
            await redis.aclose()
            raise
        worker = cls(config, redis, spawner, metrics, secrets)
        try:
            await worker.store.ensure_groups(worker.worker_id)
            for warning in await worker.store.durability_warnings():
                worker.log.warning("redis configuration: %s", warning)
        except BaseException:
            await worker.close()
            raise
        return worker

    def health(self) -> http.HealthSource:
        return http.HealthSource(
            zygote_alive=self.spawner.zygote.is_alive,
            redis_ping=self.redis.ping,
            missing_layers=lambda: self.missing_layers,
            draining=self.stopping.is_set,
        )

    # --- lifecycle -------------------------------------------------------------------------

    async def serve(self, install_signals: bool = True) -> None:
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
        # HTTP first: a busy port then stops the worker before any loop coroutine exists (one
        # created and never awaited would be warned about after the message).
        site = await self._start_http()
        loops = [self._reader(p) for p in range(self.config.partitions)]
        loops += [self._every(self.config.claim_idle_s / 2, self._reclaim)]
        loops += [
            self._every(0.25, self._promote),
            self._every(self.config.claim_idle_s / 3, self._heartbeat),
            self._every(GAUGE_INTERVAL_S, self._read_gauges),
        ]
        if self.config.emf_interval_s > 0:
            loops.append(self._every(self.config.emf_interval_s, self._print_emf))
        tasks = [asyncio.create_task(coroutine) for coroutine in loops]
        # These two go on while the worker drains; they end on `drained`.
        background = [
            asyncio.create_task(self._every(CANCEL_POLL_S, self._poll_cancels, self.drained)),
            asyncio.create_task(self._every(ANNOUNCE_INTERVAL_S, self._announce, self.drained)),
        ]
        self.log.info("worker %s serving %d partition(s)", self.worker_id, self.config.partitions)
        await self.stopping.wait()
        self.metrics.draining.set(1)
        with contextlib.suppress(RedisError, OSError):
            await self._announce()  # draining: `runnerd status` says so at once
        # Every loop ends on the event by itself, within one read block. A loop cancelled
        # mid-command could lose a reply that had already moved entries to this consumer (an
        # XREADGROUP or XAUTOCLAIM), and those would then run nowhere. One that does not end
        # in time (Redis hangs) is cancelled; whatever it took is handed back below. (Cancels
        # alone would not do anyway: on Python < 3.12 asyncio.wait_for loses a cancel that lands
        # as redis-py finishes a write, CPython gh-86296.)
        _, stuck = await asyncio.wait(tasks, timeout=LOOPS_STOP_S)
        for task in stuck:
            task.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=CANCEL_WAIT_S)
        await self.drain()
        self.drained.set()
        await self._hand_back_unstarted()
        await self._leave_group()
        await asyncio.wait(background, timeout=LOOPS_STOP_S)
        with contextlib.suppress(RedisError, OSError):
            await registry.forget(self.redis, self.keys, self.worker_id)
        if site is not None:
            await site.cleanup()
        self.log.info("worker %s stopped after %d execution(s)", self.worker_id, self.finished)

    async def _start_http(self) -> web.AppRunner | None:
        if not self.config.http_port:
            return None
        app = http.build_app(self.metrics, self.health())
        try:
            return await http.start(app, self.config.http_host, self.config.http_port)
        except OSError as exc:
            where = f"{self.config.http_host}:{self.config.http_port}"
            raise RunnerdError(f"cannot serve HTTP on {where} (RUNNERD_HTTP_PORT): {exc}") from exc

    async def drain(self) -> None:
        pending = [task for _, task in self.in_flight.values()]
        if pending:
            self.log.info(
                "draining %d in-flight execution(s), up to %g s", len(pending), self.config.drain_s
            )
            await asyncio.wait(pending, timeout=self.config.drain_s)
        for entry, task in list(self.in_flight.values()):
            task.cancel()
            with contextlib.suppress(RedisError, OSError):
                await self.store.give_back(entry)
        # A cancel can be lost inside redis-py on Python < 3.12 (see serve): do not wait on a
        # handed-back execution for ever; the spawner's close kills its child anyway.
        leftovers = [task for _, task in self.in_flight.values()]
        if leftovers:
            await asyncio.wait(leftovers, timeout=CANCEL_WAIT_S)

    async def _hand_back_unstarted(self) -> None:
        """Give back what Redis lists as this worker's but never ran here: entries a read or a
        reclaim took as the worker stopped. Without this they would sit pending until another
        worker's reclaim, or be dropped with the consumer."""
        for partition in range(self.config.partitions):
            try:
                returned = await self.store.give_back_pending(partition, self.worker_id)
            except (RedisError, OSError) as exc:
                self.log.warning("could not hand back partition %d's entries: %s", partition, exc)
                continue
            if returned:
                what = f"{returned} unstarted entries of partition {partition}"
                self.log.info("handed back %s", what)

    async def _leave_group(self) -> None:
        """Remove this worker from the group, so the count of live workers, and the backlog
        per worker, drop at once. Only when it holds nothing: what it still holds (an entry
        without a body, a hand-back that failed) stays for another worker to reclaim."""
        for partition in range(self.config.partitions):
            with contextlib.suppress(RedisError, OSError):
                await self.store.leave_group(partition, self.worker_id)

    async def close(self) -> None:
        await self.spawner.close()
        await self.redis.aclose()

    # --- loops -----------------------------------------------------------------------------

    async def _reader(self, partition: int) -> None:
        failures = 0
        while not self.stopping.is_set():
            await self.capacity.wait_free()
            try:
                await self._read(partition)
                failures = 0
            except RedisError as exc:
                failures += 1
                await self._back_off("read", exc, failures)

    async def _read(self, partition: int) -> None:
        """Block for one new entry holding no capacity: a reader waiting on an idle stream must
        not starve the other partitions' readers or the reclaimer. That entry may run one past
        the limit; the backlog behind it is read, without blocking, into free slots only."""
        entries = await self.store.read_new(partition, self.worker_id, 1, READ_BLOCK_MS)
        if self.stopping.is_set():  # read as the worker stopped: handed back, not run
            return
        for entry in entries:
            self.capacity.take_one_anyway()
            self._start(entry)
        while entries and not self.stopping.is_set():
            slots = self.capacity.take_now(self.config.concurrency)
            if slots == 0:
                return
            entries = []
            try:
                entries = await self.store.read_new(partition, self.worker_id, slots, None)
            finally:
                self.capacity.give(slots - len(entries))
            for entry in entries:
                self._start(entry)

    def _start(self, entry: Entry) -> None:
        """Run an entry whose capacity slot is already taken."""
        key = (entry.partition, entry.entry_id)
        # Reclaimed from ourselves: it is already running here. Taken as the worker stopped:
        # it stays pending and is handed back with the rest.
        if key in self.in_flight or self.stopping.is_set():
            self.capacity.give(1)
            return
        task = asyncio.create_task(self._execute(entry))
        self.in_flight[key] = (entry, task)

    async def _execute(self, entry: Entry) -> None:
        self.metrics.set_in_flight(len(self.in_flight), self.config.concurrency)
        started = time.perf_counter()
        try:
            ending = await self._with_retries(lambda: self.executor.handle(entry))
            self.finished += 1
            duration_s = time.perf_counter() - started
            if ending.status is not None and ending.item_of is None:
                self.metrics.execution_ended(ending.status, ending.integration, duration_s)
            self._log_end(entry, ending, duration_s)
        except Exception:  # the loop's edge: log and count; the entry is reclaimed later
            self.log.exception(
                "execution of entry %s failed in the worker", entry.entry_id.decode()
            )
            self.metrics.execution_ended("error", "", None)
        finally:
            self.in_flight.pop((entry.partition, entry.entry_id), None)
            self.capacity.give(1)
            self.metrics.set_in_flight(len(self.in_flight), self.config.concurrency)

    def _log_end(self, entry: Entry, ending: Ending, duration_s: float) -> None:
        """The end-of-execution line, with what an SRE filters by as fields of their own:
        the integration, the failed step, the error type, a dead letter's reason."""
        fields = {
            "execution_id": _execution_id(entry),
            "worker_id": self.worker_id,
            "integration": ending.integration or None,
            "failed_step": ending.failed_step,
            "error_type": ending.error_type,
            "reason": ending.reason,
        }
        if ending.item_of is not None:
            what = f"loop {ending.item_of} item {ending.status or 'had nothing left to do'}"
        elif ending.status is None and ending.items:
            what = f"execution handed to {ending.items} loop items"
        else:
            what = f"execution {ending.status or 'parked for a retry'}"
        # Straight to the logger: a LoggerAdapter on 3.11 would drop this call's extra.
        log.info("%s in %.1f ms", what, duration_s * 1000, extra=fields)

    async def _with_retries(self, action: Callable[[], Awaitable[T]]) -> T:
        """Run an execution; when Redis fails under it, try again (its checkpoint makes the
        retry cheap) until it goes through or the worker drains."""
        failures = 0
        while True:
            try:
                return await action()
            except RedisError as exc:
                failures += 1
                if self.stopping.is_set():
                    raise
                await self._back_off("execution", exc, failures)

    async def _reclaim(self) -> None:
        for partition in range(self.config.partitions):
            free = self.capacity.take_now(self.config.concurrency)
            if free == 0:
                return
            entries: list[Entry] = []
            try:
                idle_ms = int(self.config.claim_idle_s * 1000)
                entries = await self.store.reclaim(partition, self.worker_id, idle_ms, free)
            finally:
                self.capacity.give(free - len(entries))
            for entry in entries:
                self.log.info(
                    "reclaimed entry %s (delivery %d)", entry.entry_id.decode(), entry.deliveries
                )
                self._start(entry)
            # A consumer silent this long with nothing pending is a dead worker's leftover.
            idle_ms = max(int(self.config.claim_idle_s * 1000) * 10, CONSUMER_ACTIVE_MS * 4)
            await self.store.forget_dead_consumers(partition, idle_ms)

    async def _promote(self) -> None:
        for partition in range(self.config.partitions):
            await self.store.promote_due(partition)

    async def _heartbeat(self) -> None:
        by_partition: dict[int, list[bytes]] = {}
        for partition, entry_id in list(self.in_flight):
            by_partition.setdefault(partition, []).append(entry_id)
        for partition, entry_ids in by_partition.items():
            await self.store.touch(partition, self.worker_id, entry_ids)

    async def _read_gauges(self) -> None:
        backlog = 0
        workers: set[str] = set()
        oldest_ms: int | None = None
        for partition in range(self.config.partitions):
            backlog += await self.store.backlog(partition)
            workers |= await self.store.active_consumers(partition, CONSUMER_ACTIVE_MS)
            first_ms = await self.store.oldest_entry_ms(partition)
            if first_ms is not None and (oldest_ms is None or first_ms < oldest_ms):
                oldest_ms = first_ms
        self.metrics.set_backlog(backlog, len(workers | {self.worker_id}))
        # Stream ids carry Redis's clock, compared here with the worker's: NTP keeps them close.
        age_s = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms is not None else 0.0
        self.metrics.oldest_pending_age.set(age_s)

    async def _poll_cancels(self) -> None:
        """Read the cancel markers of what runs here, one MGET per partition (its keys share
        one slot), and cancel those an operator marked."""
        by_partition: dict[int, list[str]] = {}
        for execution_id, partition in list(self.executor.running.items()):
            by_partition.setdefault(partition, []).append(execution_id)
        for execution_ids in by_partition.values():
            for execution_id in await self.store.cancelled(execution_ids):
                if self.executor.cancel(execution_id):
                    self.log.info("cancelling execution %s (an operator's cancel)", execution_id)

    async def _announce(self) -> None:
        info = registry.WorkerInfo(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=runnerd.__version__,
            concurrency=self.config.concurrency,
            in_flight=len(self.in_flight),
            partitions=self.config.partitions,
            started_at=self.started_at,
            seen_at=time.time(),
            draining=self.stopping.is_set(),
        )
        await registry.announce(self.redis, self.keys, info)

    async def _print_emf(self) -> None:
        metrics = self.metrics
        line = emf.line(
            self.config.service_name, metrics.last_backlog_per_worker, metrics.last_saturation
        )
        print(line, flush=True)

    async def _every(
        self,
        interval_s: float,
        action: Callable[[], Awaitable[None]],
        until: asyncio.Event | None = None,
    ) -> None:
        """Run `action` every `interval_s` until `until` (default: the worker stopping)."""
        until = until or self.stopping
        failures = 0
        while not until.is_set():
            try:
                await action()
                failures = 0
            except RedisError as exc:
                failures += 1
                # Never wait longer than the loop's own interval: a heartbeat backing off past
                # claim_idle_s after a Redis hiccup lets live workers' entries be taken over.
                what = action.__name__.strip("_")
                await self._back_off(what, exc, failures, min(BACKOFF_MAX_S, interval_s))
            await self._pause(interval_s, until)

    async def _pause(self, seconds: float, until: asyncio.Event | None = None) -> None:
        """Sleep, but wake as soon as the worker is told to stop (or `until` is set)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((until or self.stopping).wait(), seconds)

    async def _back_off(
        self, what: str, exc: Exception, failures: int, most_s: float = BACKOFF_MAX_S
    ) -> None:
        self.metrics.redis_errors.labels(what).inc()
        delay = min(most_s, 0.1 * 2 ** min(failures, 6))
        self.log.warning("redis error in %s (%s); retrying in %.1f s", what, exc, delay)
        await self._pause(delay)


def _execution_id(entry: Entry) -> str | None:
    """The execution id of an entry, for log lines; None when the entry cannot be decoded."""
    try:
        return execution_decoder.decode(entry.body or b"").execution_id
    except (msgspec.DecodeError, TypeError):
        return None
