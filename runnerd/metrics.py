"""Every Prometheus metric runnerd exports, defined once, all named runnerd_*.

Each worker has its own registry (no global state shared between workers started in one process,
as tests do). Names follow Prometheus conventions: base units in the name, counters end in
_total. The autoscaling signal is `runnerd_backlog_per_worker` (and `runnerd_saturation`), which
an ECS target-tracking policy follows once it reaches CloudWatch (see README).
"""

from __future__ import annotations

import platform
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import runnerd

# 1 ms .. 5 min, roughly doubling: steps and executions span that whole range.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
SPAWN_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Waiting for a worker can take far longer than running: up to an hour.
QUEUE_WAIT_BUCKETS = DURATION_BUCKETS + (600.0, 1800.0, 3600.0)  # 1 ms .. 1 h
# Why entries are dead-lettered: a fixed set, so the label stays small whatever the reasons say.
DeadReason = Literal[
    "undecodable",
    "wrong_partition",
    "unknown_version",
    "too_many_deliveries",
    "integration_missing",
    "integration_invalid",
    "input_missing",
]
DEAD_REASONS: tuple[DeadReason, ...] = DeadReason.__args__  # type: ignore[attr-defined]
FINAL_STATUSES = ("succeeded", "failed", "dead", "cancelled")
KILL_REASONS = {"timeout": "timeout", "memory": "memory", "cpu": "cpu", "output_limit": "output"}


LOOP_ITEM_RESULTS = ("succeeded", "failed", "retried", "rerun")


class Metrics:
    def __init__(self, integration_label: bool = False) -> None:
        """`integration_label` adds the integration's name as a label of the executions
        finished and their duration (RUNNERD_METRICS_INTEGRATION_LABEL): off by default, since
        customers name integrations and each name is a new series of every bucket."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.integration_label = integration_label
        by_end = ["status", "integration"] if integration_label else ["status"]
        self.executions = Counter(
            "runnerd_executions_finished",
            "Executions finished, by final status (error: the worker failed, not the step).",
            by_end,
            registry=r,
        )
        self.steps = Counter(
            "runnerd_steps_finished",
            "Steps finished, by runtime and result (ok or error type).",
            ["runtime", "result"],
            registry=r,
        )
        self.step_duration = Histogram(
            "runnerd_step_duration_seconds",
            "Time a step took, as the worker saw it.",
            ["runtime"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.execution_duration = Histogram(
            "runnerd_execution_duration_seconds",
            "Time from taking an execution to its end, by final status.",
            by_end,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "runnerd_execution_queue_wait_seconds",
            "Time from submit to the start of an execution's first step (once per execution).",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            "runnerd_oldest_pending_age_seconds",
            "Age of the oldest entry on any work stream, waiting or running (0: none); a "
            "retried or handed-back entry is a new entry.",
            registry=r,
        )
        self.build_info = Gauge(
            "runnerd_build_info",
            "Always 1; the labels say what runs.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(runnerd.__version__, platform.python_version()).set(1)
        self.bundle_fetches = Counter(
            "runnerd_bundle_fetches",
            "Dependency bundles asked for by steps, by outcome: cached (unpacked already), "
            "fetched (from the store, then unpacked), missing, corrupt, too_large, invalid.",
            ["outcome"],
            registry=r,
        )
        self.bundle_fetch_duration = Histogram(
            "runnerd_bundle_fetch_seconds",
            "Time to fetch, check and unpack a bundle on its first use on this worker.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.bundle_evictions = Counter(
            "runnerd_bundle_evictions",
            "Bundles removed from the local cache to keep it under its cap.",
            registry=r,
        )
        self.spawn_duration = Histogram(
            "runnerd_sandbox_spawn_seconds",
            "Time to get a confined child ready for a step (near zero when one was warm).",
            ["runtime"],
            buckets=SPAWN_BUCKETS,
            registry=r,
        )
        self.kills = Counter(
            "runnerd_sandbox_kills",
            "Steps stopped by a sandbox limit, by reason (pids: a fork refused at the limit).",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "runnerd_executions_in_flight", "Executions running on this worker now.", registry=r
        )
        self.capacity = Gauge(
            "runnerd_capacity",
            "Executions this worker may run at once (RUNNERD_CONCURRENCY).",
            registry=r,
        )
        self.saturation = Gauge(
            "runnerd_saturation", "In-flight executions over capacity (0..1).", registry=r
        )
        self.backlog = Gauge(
            "runnerd_backlog",
            "Executions waiting for a worker: stream lag plus pending entries "
            "not yet acknowledged, over all partitions.",
            registry=r,
        )
        self.backlog_per_worker = Gauge(
            "runnerd_backlog_per_worker",
            "Backlog divided by the workers reading the group: the autoscaling signal.",
            registry=r,
        )
        self.workers = Gauge(
            "runnerd_workers", "Workers of the consumer group seen active recently.", registry=r
        )
        self.dead_lettered = Counter(
            "runnerd_dead_lettered",
            "Entries moved to the dead-letter stream, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in DEAD_REASONS:  # every series exists from the start, so rate() sees a 1
            self.dead_lettered.labels(reason)
        self.retried = Counter(
            "runnerd_retried", "Executions parked for a retry after a failed step.", registry=r
        )
        self.loop_items = Counter(
            "runnerd_loop_items",
            "Loop items ended on this worker, by result (succeeded, failed), and item runs "
            "repeated (retried: the item's own retries; rerun: its worker was lost).",
            ["result"],
            registry=r,
        )
        for result in LOOP_ITEM_RESULTS:
            self.loop_items.labels(result)
        self.redis_errors = Counter(
            "runnerd_redis_errors",
            "Redis operations that failed (each is retried).",
            ["operation"],
            registry=r,
        )
        self.layers = Gauge(
            "runnerd_sandbox_layer",
            "Sandbox layers on this host: 1 applied, 0 missing.",
            ["layer"],
            registry=r,
        )
        self.draining = Gauge(
            "runnerd_draining", "1 while the worker drains before exit.", registry=r
        )
        self.last_saturation = 0.0
        self.last_backlog_per_worker = 0.0
        if not integration_label:
            for status in FINAL_STATUSES:
                self.executions.labels(status)

    def execution_ended(self, status: str, integration: str, duration_s: float | None) -> None:
        """Count an execution's end (`integration` is used only when the label is on)."""
        labels = [status, integration] if self.integration_label else [status]
        self.executions.labels(*labels).inc()
        if duration_s is not None:
            self.execution_duration.labels(*labels).observe(duration_s)

    def step_finished(self, runtime: str, error_type: str | None, duration_s: float) -> None:
        self.steps.labels(runtime, error_type or "ok").inc()
        self.step_duration.labels(runtime).observe(duration_s)
        reason = KILL_REASONS.get(error_type or "")
        if reason is not None:
            self.kills.labels(reason).inc()

    def child_exited(self, pids_limited: bool) -> None:
        """A step's child was reaped; count it if its cgroup refused it a process."""
        if pids_limited:
            self.kills.labels("pids").inc()

    def set_in_flight(self, in_flight: int, capacity: int) -> None:
        self.in_flight.set(in_flight)
        self.capacity.set(capacity)
        self.last_saturation = min(1.0, in_flight / capacity) if capacity else 0.0
        self.saturation.set(self.last_saturation)

    def set_backlog(self, backlog: int, workers: int) -> None:
        self.backlog.set(backlog)
        self.workers.set(workers)
        self.last_backlog_per_worker = backlog / max(1, workers)
        self.backlog_per_worker.set(self.last_backlog_per_worker)
