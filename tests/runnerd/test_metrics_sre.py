"""What an SRE reads on a real `runnerd serve`'s /metrics and in its log: the queue wait, the
oldest entry's age, the build, dead letters by reason, execution duration by status, the
integration label only when opted in, and the end-of-execution line's fields."""

from __future__ import annotations

import json
import platform
import re
import time
from typing import Any

import redis

import runnerd
from runnerd.keys import Keys
from runnerd.messages import Integration
from tests.runnerd.conftest import (
    SHARED_REDIS_URL,
    ServeFactory,
    free_port,
    run_async,
    run_one,
    submit_all,
    wait_all,
    wait_for,
)
from tests.runnerd.test_http import ECHO, SLEEPY, get, metric

QUEUED_S = 1.5
DEAD_ENDED = 'runnerd_execution_duration_seconds_count{status="dead"} 1.0'
BOOM = Integration.from_dict(
    {
        "name": "boom",
        "retries": 0,
        "steps": [
            {"name": "fine", "source": "def run(i, c):\n    return i\n"},
            {"name": "explode", "source": "def run(i, c):\n    raise ValueError('no')\n"},
        ],
    }
)


def scrape(port: int) -> str:
    return get(port, "/metrics")[1]


def log_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_queue_wait_build_dead_letters_and_duration_by_status(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    # Queued with no worker running: its wait is at least QUEUED_S, plus the worker's start.
    (queued,) = run_async(submit_all(SHARED_REDIS_URL, prefix, ECHO, ["q"]))
    time.sleep(QUEUED_S)
    port = free_port()
    daemon = serve(http_port=port)
    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [queued]))
    assert result.ok
    assert not run_one(BOOM, 1, prefix).ok
    shared_redis.xadd(Keys(prefix, 1).work(0), {"e": b"\xc1 not msgpack"})
    text = wait_for(
        lambda: (lambda t: t if DEAD_ENDED in t else None)(scrape(port)),
        10,
        "the dead letter's end to be counted",
    )

    assert metric(text, "runnerd_execution_queue_wait_seconds_count") == 2
    assert metric(text, "runnerd_execution_queue_wait_seconds_sum") >= QUEUED_S
    assert metric(text, "runnerd_execution_queue_wait_seconds_bucket", '{le="1.0"}') == 1
    build = f'{{python="{platform.python_version()}",version="{runnerd.__version__}"}}'
    assert metric(text, "runnerd_build_info", build) == 1
    assert metric(text, "runnerd_dead_lettered_total", '{reason="undecodable"}') == 1
    assert metric(text, "runnerd_dead_lettered_total", '{reason="integration_missing"}') == 0
    assert metric(text, "runnerd_execution_duration_seconds_count", '{status="succeeded"}') == 1
    assert metric(text, "runnerd_execution_duration_seconds_count", '{status="failed"}') == 1
    assert metric(text, "runnerd_execution_duration_seconds_count", '{status="dead"}') == 1
    assert metric(text, "runnerd_executions_finished_total", '{status="failed"}') == 1
    assert "integration=" not in text  # names stay out of labels unless opted in

    ends = [line for line in log_lines(daemon.log()) if line["msg"].startswith("execution ")]
    failed = next(line for line in ends if line["msg"].startswith("execution failed"))
    assert failed["integration"] == "boom" and failed["failed_step"] == "explode"
    assert failed["error_type"] == "exception"
    dead = next(line for line in ends if line["msg"].startswith("execution dead"))
    assert dead["reason"] == "undecodable" and "integration" not in dead
    succeeded = next(line for line in ends if line["msg"].startswith("execution succeeded"))
    assert succeeded["integration"] == "echo" and "failed_step" not in succeeded


def test_oldest_pending_age_follows_the_stream(serve: ServeFactory, prefix: str) -> None:
    port = free_port()
    serve(http_port=port, concurrency=1)
    assert metric(scrape(port), "runnerd_oldest_pending_age_seconds") == 0
    ids = run_async(submit_all(SHARED_REDIS_URL, prefix, SLEEPY, [8]))  # past a gauge read
    wait_for(lambda: metric(scrape(port), "runnerd_oldest_pending_age_seconds") >= 1, 12, "an age")
    assert all(r.ok for r in run_async(wait_all(SHARED_REDIS_URL, prefix, ids)))
    wait_for(lambda: metric(scrape(port), "runnerd_oldest_pending_age_seconds") == 0, 12, "age 0")


def test_integration_label_only_when_opted_in(serve: ServeFactory, prefix: str) -> None:
    port = free_port()
    serve(http_port=port, metrics_integration_label="true")
    assert run_one(ECHO, 1, prefix).ok
    assert not run_one(BOOM, 1, prefix).ok
    text = scrape(port)
    labels = '{integration="echo",status="succeeded"}'
    assert metric(text, "runnerd_executions_finished_total", labels) == 1
    assert metric(text, "runnerd_execution_duration_seconds_count", labels) == 1
    labels = '{integration="boom",status="failed"}'
    assert metric(text, "runnerd_executions_finished_total", labels) == 1
    # Only these two carry it; the step series stay by runtime.
    labelled = {m.group(1) for m in re.finditer(r"^(\w+)\{[^}]*integration=", text, re.M)}
    assert {re.sub("_(total|created|bucket|count|sum)$", "", name) for name in labelled} == {
        "runnerd_executions_finished",
        "runnerd_execution_duration_seconds",
    }
