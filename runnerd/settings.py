"""The one Settings object: defaults, then environment (`RUNNERD_<FIELD>`), then CLI flags.

Each field has a type, a default, its unit in its name and a line of help (in SETTINGS_HELP);
its environment variable is derived from its name, and cli.py builds flags from the same table.
Read once, at start, in cli.py; a bad value raises ConfigError naming the variable or flag.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from runnerd.errors import ConfigError
from runnerd.secret_source import parse_allowlist
from sandbox.layers import ALL_LAYERS

SandboxMode = Literal["strict", "best-effort"]


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    concurrency: int = 8
    partitions: int = 1
    key_prefix: str = "runnerd"
    result_ttl_s: float = 86400.0
    claim_idle_s: float = 30.0
    max_deliveries: int = 5
    drain_s: float = 25.0
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http_port: int = 8080
    http_host: str = "0.0.0.0"
    emf_interval_s: float = 0.0
    metrics_integration_label: bool = False
    service_name: str = "runnerd-worker"
    sandbox_mode: SandboxMode = "best-effort"
    sandbox_require: tuple[str, ...] = ("uid_drop", "rlimits", "no_new_privs", "seccomp")
    sandbox_uid_base: int = 0
    sandbox_slots: int = 256
    pool_size: int = 2
    node_path: str = ""
    node_fork: bool = True
    loop_items_max: int = 10_000
    secrets_dir: str = ""
    secrets_allow: str = ""
    bundle_cache_dir: str = "/var/cache/runnerd/bundles"
    bundle_cache_mb: int = 2048
    bundle_max_mb: int = 256


SETTINGS_HELP: dict[str, str] = {
    "redis_url": "Redis to take work from; a cluster is recognised by itself",
    "concurrency": "executions this worker runs at once",
    "partitions": "work streams the executions are spread over (each its own hash tag); "
    "clients and workers must agree",
    "key_prefix": "prefix of every Redis key, so several deployments can share one Redis",
    "result_ttl_s": "how long results (and checkpoints) are kept",
    "claim_idle_s": "an entry held this long by a silent worker is taken over by another",
    "max_deliveries": "an entry delivered more often than this goes to the dead-letter stream",
    "drain_s": "on SIGTERM, how long in-flight executions may finish before they are handed "
    "back (keep it below ECS's stopTimeout, 30 s by default)",
    "retry_base_s": "first retry delay of a failed execution (doubling, with jitter)",
    "retry_max_s": "longest retry delay",
    "log_level": "debug, info, warning or error",
    "http_port": "port of /healthz, /readyz and /metrics (0: no HTTP server)",
    "http_host": "address the HTTP server listens on",
    "emf_interval_s": "print the autoscaling signal as a CloudWatch EMF line this often (0: off)",
    "metrics_integration_label": "label executions finished and their duration with the "
    "integration's name (each name is new series: keep it off unless their number is small)",
    "service_name": "the Service dimension of the EMF metrics (the ECS service's name)",
    "sandbox_mode": "strict: refuse to run steps when a required layer is missing; "
    "best-effort: run with what the host allows and say so",
    "sandbox_require": "comma list of sandbox layers that must be present (see `runnerd doctor`)",
    "sandbox_uid_base": (
        "first host uid of the per-child-slot uids (uid_base .. uid_base+slots), claimed for "
        "the instance's life; 0: the first free range from 200000 on"
    ),
    "sandbox_slots": "most children alive at once (running or warm)",
    "pool_size": "warm, already-confined children kept per runtime (0: spawn on demand)",
    "node_path": "the node binary for JavaScript steps",
    "node_fork": "fork JavaScript steps from a warm node zygote (false: start a node per step)",
    "loop_items_max": "most items a for_each loop may have (a loop's max_items may only lower it)",
    "secrets_dir": "directory of secret files (file name = secret name) that steps may name "
    'with {"secret": NAME}; RUNNERD_SECRET_<NAME> variables are the other source',
    "secrets_allow": "which integrations may use which secrets: INTEGRATION=SECRET,...;... "
    "(`*` a wildcard on either side); empty: none may",
    "bundle_cache_dir": "where this worker keeps unpacked dependency bundles (root's; steps "
    "read them, never write them); may be shared by the workers of one host",
    "bundle_cache_mb": "size of the bundle cache; past it the least recently used bundles go",
    "bundle_max_mb": "largest bundle, packed or unpacked, that is built or fetched",
}


def env_name(field: str) -> str:
    return "REDIS_URL" if field == "redis_url" else f"RUNNERD_{field.upper()}"


def load(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build Settings from the environment and CLI overrides (None means "not given")."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field in Settings.__struct_fields__:
        name = env_name(field)
        if name in environ:
            raw[field] = _parse_env(field, environ[name])
            sources[field] = name
    for field, value in (overrides or {}).items():
        if value is not None:
            raw[field] = value
            sources[field] = "--" + field.replace("_", "-")
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from exc
    return _validate(settings)


def _parse_env(field: str, value: str) -> Any:
    if field == "sandbox_require":
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _explain(exc: msgspec.ValidationError, sources: dict[str, str]) -> str:
    message = str(exc)
    for field, source in sources.items():
        if f"`$.{field}`" in message:
            if message.startswith("Expected `bool`"):
                return f"{source}: expected true or false (or 1 or 0)"
            return f"{source}: {message.split(' - at ')[0]}"
    return message


def _validate(settings: Settings) -> Settings:
    unknown = [layer for layer in settings.sandbox_require if layer not in ALL_LAYERS]
    if unknown:
        raise ConfigError(
            f"{env_name('sandbox_require')}: unknown sandbox layer(s) {', '.join(unknown)}; "
            f"known: {', '.join(ALL_LAYERS)}"
        )
    if settings.pool_size < 0:
        raise ConfigError(f"{env_name('pool_size')}: must not be negative")
    if 0 < settings.sandbox_uid_base < 1000 or settings.sandbox_uid_base < 0:
        raise ConfigError(
            f"{env_name('sandbox_uid_base')}: must be 0 (pick a free range) or at least 1000, "
            "above the system's own uids"
        )
    for field in (
        "sandbox_slots",
        "concurrency",
        "partitions",
        "result_ttl_s",
        "claim_idle_s",
        "max_deliveries",
        "retry_base_s",
        "retry_max_s",
        "loop_items_max",
        "bundle_cache_mb",
        "bundle_max_mb",
    ):
        if getattr(settings, field) <= 0:
            raise ConfigError(f"{env_name(field)}: must be positive")
    if settings.drain_s < 0:
        raise ConfigError(f"{env_name('drain_s')}: must not be negative")
    if not 0 <= settings.http_port <= 65535:
        raise ConfigError(f"{env_name('http_port')}: must be a port number (0-65535)")
    if settings.emf_interval_s < 0:
        raise ConfigError(f"{env_name('emf_interval_s')}: must not be negative")
    if settings.sandbox_slots < settings.concurrency + 2 * settings.pool_size:
        raise ConfigError(
            f"{env_name('sandbox_slots')}: must be at least concurrency + 2 x pool_size "
            f"({settings.concurrency + 2 * settings.pool_size})"
        )
    parse_allowlist(settings.secrets_allow, env_name("secrets_allow"))
    if not os.path.isabs(settings.bundle_cache_dir):
        raise ConfigError(f"{env_name('bundle_cache_dir')}: must be an absolute path")
    node = settings.node_path or shutil.which("node", path=os.environ.get("PATH")) or ""
    return msgspec.structs.replace(settings, node_path=node)
