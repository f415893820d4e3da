"""Health, readiness and metrics of a real `runnerd serve`: what ECS and Prometheus see.

A real Prometheus server scrapes it; promtool checks the exposition; readiness follows Redis
and draining; the endpoints keep answering while the worker is saturated; the EMF line matches
the CloudWatch format and deploy/autoscaling.json; the Dockerfile's CMD and HEALTHCHECK run."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from runnerd.messages import Integration
from tests.conftest import ROOT, runnerd_env
from tests.runnerd.conftest import (
    SHARED_REDIS_URL,
    RedisServer,
    ServeFactory,
    free_port,
    run_async,
    run_one,
    submit_all,
    wait_all,
    wait_for,
)

ECHO = Integration.from_dict(
    {"name": "echo", "steps": [{"name": "echo", "source": "def run(i, c):\n    return i\n"}]}
)
SLEEPY = Integration.from_dict(
    {
        "name": "sleepy",
        "steps": [{"name": "nap", "source": "import time\ndef run(i, c):\n    time.sleep(i)\n"}],
    }
)


def get(port: int, path: str, timeout_s: float = 5) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


def test_health_ready_and_metrics(serve: ServeFactory, prefix: str) -> None:
    port = free_port()
    serve(http_port=port, concurrency=4)
    assert get(port, "/healthz") == (200, '{"status": "ok", "zygote": true}')
    status, body = get(port, "/readyz")
    assert status == 200, body
    assert json.loads(body)["checks"] == {
        "redis": True,
        "zygote": True,
        "sandbox_layers": True,
        "not_draining": True,
    }
    for n in range(3):
        assert run_one(ECHO, n, prefix).output == n
    _, text = get(port, "/metrics")
    assert metric(text, "runnerd_executions_finished_total", '{status="succeeded"}') == 3
    assert metric(text, "runnerd_steps_finished_total", '{result="ok",runtime="python"}') == 3
    assert metric(text, "runnerd_capacity") == 4
    assert metric(text, "runnerd_sandbox_layer", '{layer="seccomp"}') == 1
    assert metric(text, "runnerd_step_duration_seconds_count", '{runtime="python"}') == 3
    assert "runnerd_backlog_per_worker" in text and "runnerd_sandbox_spawn_seconds_bucket" in text


FORKS = Integration.from_dict(
    {
        "name": "forks",
        "limits": {"pids": 8},
        "steps": [
            {
                "name": "bomb",
                "source": "import os, time\n"
                "def run(i, c):\n"
                "    for _ in range(20):\n"
                "        if os.fork() == 0:\n"
                "            time.sleep(5)\n"
                "            os._exit(0)\n",
            }
        ],
    }
)
HURRIED = Integration.from_dict(
    {
        "name": "hurried",
        "limits": {"wall_s": 0.5},
        "steps": [{"name": "nap", "source": "import time\ndef run(i, c):\n    time.sleep(i)\n"}],
    }
)


def test_limit_kills_are_counted_by_reason(serve: ServeFactory, prefix: str) -> None:
    port = free_port()
    serve(http_port=port)
    assert run_one(HURRIED, 5, prefix).error.type == "timeout"
    assert run_one(FORKS, None, prefix).error.type == "exception"  # BlockingIOError at the limit

    def counted() -> str | None:
        text = get(port, "/metrics")[1]
        return text if 'reason="pids"' in text else None

    text = wait_for(counted, 10, "the pids limit to be counted")
    assert metric(text, "runnerd_sandbox_kills_total", '{reason="timeout"}') == 1
    assert metric(text, "runnerd_sandbox_kills_total", '{reason="pids"}') >= 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_metrics_pass_promtool(serve: ServeFactory, prefix: str) -> None:
    port = free_port()
    serve(http_port=port)
    run_one(ECHO, 1, prefix)
    _, text = get(port, "/metrics")
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_a_real_prometheus_scrapes_and_answers_promql(
    serve: ServeFactory, prefix: str, tmp_path: Path
) -> None:
    port, prometheus_port = free_port(), free_port()
    serve(http_port=port, concurrency=3)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: runnerd\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_one(ECHO, 1, prefix)

        def answer() -> Any:
            query = "runnerd_capacity * on(instance) group_left() up"
            try:
                status, body = get(prometheus_port, f"/api/v1/query?query={quote(query)}")
            except urllib.error.URLError:
                return None  # not listening yet
            results = json.loads(body)["data"]["result"] if status == 200 else []
            return results or None

        (sample,) = wait_for(answer, 30, "Prometheus to scrape runnerd")
        assert sample["metric"]["job"] == "runnerd"
        assert float(sample["value"][1]) == 3
    finally:
        prometheus.terminate()
        prometheus.wait(10)


def test_not_ready_while_redis_is_down(
    serve: ServeFactory, prefix: str, private_redis: RedisServer
) -> None:
    port = free_port()
    daemon = serve(redis_url=private_redis.url, http_port=port)
    assert get(port, "/readyz")[0] == 200
    private_redis.stop()
    status, body = get(port, "/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["redis"] is False
    assert get(port, "/healthz")[0] == 200  # alive: ECS must not kill it for Redis' sake
    assert daemon.is_alive()


def test_not_ready_while_draining(serve: ServeFactory, prefix: str) -> None:
    port = free_port()
    daemon = serve(http_port=port, drain_s=20)
    (execution_id,) = run_async(submit_all(SHARED_REDIS_URL, prefix, SLEEPY, [3]))
    wait_for(
        lambda: "in_flight 1.0" in get(port, "/metrics")[1].replace("runnerd_executions_", ""),
        10,
        "the execution to start",
    )
    daemon.signal(signal.SIGTERM)
    status, body = wait_for(
        lambda: (lambda r: r if r[0] == 503 else None)(get(port, "/readyz")), 5, "not ready"
    )
    assert json.loads(body)["checks"]["not_draining"] is False
    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id]))
    assert result.ok
    assert daemon.wait(30) == 0


def test_endpoints_answer_while_the_worker_is_saturated(serve: ServeFactory, prefix: str) -> None:
    port = free_port()
    serve(http_port=port, concurrency=4)
    ids = run_async(submit_all(SHARED_REDIS_URL, prefix, SLEEPY, [2] * 12))
    wait_for(lambda: "runnerd_saturation 1.0" in get(port, "/metrics")[1], 15, "saturation")
    for path in ("/metrics", "/healthz", "/readyz") * 5:
        started = time.monotonic()
        status, _ = get(port, path, timeout_s=1)
        assert status == 200 and time.monotonic() - started < 1, path
    assert all(r.ok for r in run_async(wait_all(SHARED_REDIS_URL, prefix, ids, timeout_s=60)))


def test_emf_line_matches_the_spec_and_the_autoscaling_policy(
    serve: ServeFactory, prefix: str
) -> None:
    daemon = serve(emf_interval_s=0.5, service_name="runnerd-test")
    line = wait_for(
        lambda: next((x for x in daemon.log().splitlines() if '"_aws"' in x), None), 10, "EMF"
    )
    document = json.loads(line)
    directives = document["_aws"]["CloudWatchMetrics"]
    assert isinstance(document["_aws"]["Timestamp"], int)
    policy = json.loads((ROOT / "deploy" / "autoscaling.json").read_text())["PutScalingPolicy"]
    tracked = policy["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    (directive,) = directives
    assert directive["Namespace"] == tracked["Namespace"]
    assert [tracked["Dimensions"][0]["Name"]] in directive["Dimensions"]
    names = [m["Name"] for m in directive["Metrics"]]
    assert tracked["MetricName"] in names
    # Every dimension and metric named by a directive is a top-level member (the spec's rule).
    for member in names + [d for dims in directive["Dimensions"] for d in dims]:
        assert member in document, member
    assert document["Service"] == "runnerd-test"
    assert isinstance(document[tracked["MetricName"]], int | float)


def test_logs_are_json_lines_with_the_worker_id(serve: ServeFactory, prefix: str) -> None:
    daemon = serve(log_level="debug")
    run_one(ECHO, 1, prefix)
    # The worker logs the execution's end just after writing its result.
    wait_for(lambda: "execution succeeded" in daemon.log(), 10, "the execution's log line")
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert any(line.get("worker_id") == daemon.worker_id for line in lines)
    # The shared test Redis keeps nothing on disk: the worker says what that risks.
    assert any("persistence is off" in line["msg"] for line in lines if line["level"] == "warning")
    finished = [line for line in lines if line["msg"].startswith("execution succeeded")]
    assert finished and finished[0]["execution_id"] and finished[0]["level"] == "info", lines
    steps = [line for line in lines if line.get("step") == "echo"]  # debug: one per step
    assert steps and steps[0]["execution_id"] == finished[0]["execution_id"]


def _dockerfile_instruction(name: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    found = re.search(rf"^{name} .*?(\[.*\])$", text, re.M)
    assert found, name
    return list(json.loads(found.group(1)))


def test_what_the_image_runs(serve: ServeFactory, prefix: str, tmp_path: Path) -> None:
    """The image's ENTRYPOINT + CMD serve, and its HEALTHCHECK command passes against it."""
    entrypoint, command = _dockerfile_instruction("ENTRYPOINT"), _dockerfile_instruction("CMD")
    healthcheck = _dockerfile_instruction("HEALTHCHECK")
    assert entrypoint == ["runnerd"] and command == ["serve"]
    port = free_port()
    env = runnerd_env(RUNNERD_HTTP_PORT=str(port), RUNNERD_KEY_PREFIX=prefix)
    runnerd = [sys.executable, "-m", "runnerd"]
    process = subprocess.Popen(
        runnerd + command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        check = runnerd + healthcheck[1:]
        wait_for(lambda: subprocess.run(check, env=env).returncode == 0, 30, "healthy")
    finally:
        process.terminate()
        assert process.wait(30) == 0
    assert subprocess.run(runnerd + healthcheck[1:], env=env, capture_output=True).returncode == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUNNERD_HTTP_PORT", "eighty"),
        ("RUNNERD_HTTP_PORT", "70000"),
        ("RUNNERD_CONCURRENCY", "-1"),
        ("RUNNERD_SANDBOX_REQUIRE", "seccomp,teleport"),
        ("RUNNERD_SANDBOX_MODE", "paranoid"),
    ],
)
def test_bad_settings_stop_serve_with_one_line(variable: str, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runnerd", "serve"],
        env=runnerd_env(**{variable: value}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert variable in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
