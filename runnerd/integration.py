"""The Integration Struct, and reading an integration file: validated with msgspec, every error
naming its field.

The file format (JSON):

    {"name": "orders", "retries": 2, "limits": {"wall_s": 10},
     "steps": [{"name": "fetch", "code": "steps/fetch.py"},
               {"name": "shape", "runtime": "node",
                "source": "export function run(i) { return i }"},
               {"name": "sort", "exec": ["jq", "sort"], "network": true,
                "limits": {"memory_mb": 256}}]}

`code` paths are resolved relative to the file and their text travels with the execution, so
workers need no shared disk. Limits merge: defaults, then the integration's, then the step's.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import typing
from pathlib import Path
from typing import Any

import msgspec

from runnerd import bundle_spec
from runnerd.bundle_spec import Dependencies
from runnerd.errors import ConfigError
from sandbox.protocol import Limits, Runtime

_encoder = msgspec.msgpack.Encoder()


class StepDefinition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A step as it travels with an execution: code inline, limits resolved."""

    name: str
    runtime: Runtime
    filename: str
    source: str = ""
    argv: list[str] = []
    limits: Limits = Limits()
    env: dict[str, str] = {}
    bundle: str = ""  # the id of its dependency bundle (runnerd/bundle_spec.py), never its files


class Integration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An ordered list of steps; stored in Redis once per content hash."""

    name: str
    steps: list[StepDefinition]
    retries: int = 0

    @classmethod
    def load(cls, path: str | Path) -> Integration:
        """Read and validate an integration JSON file (ConfigError names the bad field)."""
        return load(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path = ".") -> Integration:
        return from_dict(data, base_dir)


RUNTIME_BY_SUFFIX: dict[str, Runtime] = {
    ".py": "python",
    ".js": "node",
    ".mjs": "node",
    ".cjs": "node",
}
RETRIES_MAX = 20


class LimitsOverride(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    wall_s: float | None = None
    cpu_s: int | None = None
    memory_mb: int | None = None
    pids: int | None = None
    open_files: int | None = None
    file_size_mb: int | None = None
    tmp_mb: int | None = None
    output_mb: int | None = None
    stdio_kb: int | None = None
    network: bool | None = None


class StepFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    code: str | None = None
    source: str | None = None
    runtime: Runtime | None = None
    exec: list[str] | None = None
    limits: LimitsOverride | None = None
    network: bool | None = None
    env: dict[str, str] = {}
    dependencies: Dependencies | None = None


class IntegrationFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    steps: list[StepFile]
    retries: int = 0
    limits: LimitsOverride | None = None
    dependencies: Dependencies | None = None


def load(path: str | Path) -> Integration:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read integration file {str(path)!r}: {exc.strerror}") from exc
    try:
        spec = msgspec.json.decode(text, type=IntegrationFile)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: {explain(str(exc), text)}") from exc
    return _resolve(spec, path.parent, str(path))


def from_dict(data: dict[str, Any], base_dir: str | Path = ".") -> Integration:
    try:
        spec = msgspec.convert(data, IntegrationFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"integration: {explain(str(exc))}") from exc
    return _resolve(spec, Path(base_dir), "integration")


# --- what msgspec says, said for the author --------------------------------------------------

# Where each Struct of the file format sits (list indices written `[]`).
_STRUCT_AT: dict[str, tuple[type[msgspec.Struct], str]] = {
    "$": (IntegrationFile, "an integration"),
    "$.limits": (LimitsOverride, "limits"),
    "$.steps[]": (StepFile, "a step"),
    "$.steps[].limits": (LimitsOverride, "limits"),
    "$.dependencies": (Dependencies, "dependencies"),
    "$.steps[].dependencies": (Dependencies, "dependencies"),
}
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`(?: - at `(?P<at>[^`]+)`)?")
_ENUM = re.compile(r"Invalid enum value (?P<value>.+?) - at `(?P<at>[^`]+)`")
_BYTE = re.compile(r"\(byte (?P<offset>\d+)\)")


def explain(message: str, text: bytes | None = None) -> str:
    """msgspec's message with what the author needs added: the field they meant, the values a
    field takes, and a line and column for a byte offset."""
    if found := _UNKNOWN.fullmatch(message):
        return _unknown_field(found["field"], found["at"] or "$")
    if found := _ENUM.fullmatch(message):
        return _bad_value(found["value"], found["at"]) or message
    if text is not None and (found := _BYTE.search(message)):
        line, column = _line_column(text, int(found["offset"]))
        return message.replace(found[0], f"(line {line}, column {column})")
    return message


def _unknown_field(field: str, at: str) -> str:
    struct, what = _STRUCT_AT.get(re.sub(r"\[\d+\]", "[]", at), (None, ""))
    if struct is None:
        return f"unknown field `{field}` at `{at}`"
    fields = list(struct.__struct_fields__)
    close = difflib.get_close_matches(field, fields, n=1, cutoff=0.6)
    meant = f"; did you mean `{close[0]}`?" if close else ""
    return f"`{at}`: unknown field `{field}`{meant} ({what} has: {', '.join(fields)})"


def _bad_value(value: str, at: str) -> str | None:
    parent, _, field = at.rpartition(".")
    struct, _ = _STRUCT_AT.get(re.sub(r"\[\d+\]", "[]", parent), (None, ""))
    if struct is None:
        return None
    hint = typing.get_type_hints(struct).get(field)
    choices = [str(v) for arg in typing.get_args(hint) or (hint,) for v in typing.get_args(arg)]
    if not choices:
        return None
    close = difflib.get_close_matches(value.strip("'\""), choices, n=1, cutoff=0.5)
    meant = f"; did you mean {close[0]!r}?" if close else ""
    return f"`{at}`: {value} is not one of {', '.join(choices)}{meant}"


def _line_column(text: bytes, offset: int) -> tuple[int, int]:
    start = text.rfind(b"\n", 0, offset) + 1
    column = len(text[start:offset].decode(errors="replace")) + 1
    return text.count(b"\n", 0, offset) + 1, column


def digest(integration: Integration) -> str:
    return hashlib.sha256(_encoder.encode(integration)).hexdigest()


def _resolve(spec: IntegrationFile, base: Path, where: str) -> Integration:
    if not spec.steps:
        raise ConfigError(f"{where}: `$.steps` must list at least one step")
    if not 0 <= spec.retries <= RETRIES_MAX:
        raise ConfigError(f"{where}: `$.retries` must be between 0 and {RETRIES_MAX}")
    names = [step.name for step in spec.steps]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{where}: step names must be unique; repeated: {', '.join(duplicates)}")
    base_limits = _merge(Limits(), spec.limits, where, "$.limits")
    steps = [
        _resolve_step(step, base, base_limits, where, f"$.steps[{index}]")
        for index, step in enumerate(spec.steps)
    ]
    bundles = bundle_specs(spec, base, where)
    steps = [msgspec.structs.replace(s, bundle=bundles.get(s.name, "")) for s in steps]
    return Integration(name=spec.name, steps=steps, retries=spec.retries)


def bundle_specs(spec: IntegrationFile, base: Path, where: str) -> dict[str, str]:
    """Step name -> the id of its bundle: its own dependencies, else the integration's
    (exec steps get none). What `runnerd bundle build` installs comes from the same reading."""
    return {name: found.id for name, found in declared_bundles(spec, base, where).items()}


def declared_bundles(
    spec: IntegrationFile, base: Path, where: str
) -> dict[str, bundle_spec.BundleSpec]:
    shared = bundle_spec.resolve(spec.dependencies, base, where, "$.dependencies")
    found = {}
    for index, step in enumerate(spec.steps):
        own = bundle_spec.resolve(step.dependencies, base, where, f"$.steps[{index}].dependencies")
        if step.exec is None and (own or shared):
            found[step.name] = own or shared
    return {name: value for name, value in found.items() if value is not None}


def _resolve_step(
    step: StepFile, base: Path, limits: Limits, where: str, at: str
) -> StepDefinition:
    kinds = [kind for kind in ("code", "source", "exec") if getattr(step, kind) is not None]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: `{at}` needs exactly one of code, source or exec")
    limits = _merge(limits, step.limits, where, f"{at}.limits")
    if step.network is not None:
        limits = msgspec.structs.replace(limits, network=step.network)
    if step.exec is not None:
        if not step.exec:
            raise ConfigError(f"{where}: `{at}.exec` must name a program")
        return StepDefinition(
            step.name, "exec", step.exec[0], argv=step.exec, limits=limits, env=step.env
        )
    if step.source is not None:
        if step.runtime is None and _looks_like_javascript(step.source):
            raise ConfigError(
                f"{where}: `{at}.source` looks like JavaScript, and inline sources are Python "
                'unless they say otherwise: add "runtime": "node"'
            )
        return StepDefinition(
            step.name,
            step.runtime or "python",
            step.name,
            source=step.source,
            limits=limits,
            env=step.env,
        )
    code_path = base / str(step.code)
    runtime = RUNTIME_BY_SUFFIX.get(code_path.suffix)
    if runtime is None:
        raise ConfigError(f"{where}: `{at}.code` must be a .py, .js, .mjs or .cjs file")
    try:
        source = code_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: `{at}.code`: cannot read {str(code_path)!r}: {exc}") from exc
    return StepDefinition(
        step.name, runtime, code_path.name, source=source, limits=limits, env=step.env
    )


_PYTHON_RUN = re.compile(r"^[ \t]*(async\s+)?def\s+run\s*\(", re.MULTILINE)
_JAVASCRIPT_RUN = re.compile(
    r"^[ \t]*(export\s+(default\s+)?(async\s+)?function|module\.exports|exports\.run\s*=)"
    r"|\bfunction\s+run\s*\(|=>",
    re.MULTILINE,
)


def _looks_like_javascript(source: str) -> bool:
    """Without a Python `def run(` and with a JavaScript export or function: told from the
    text alone (the caller never compiles customer code)."""
    return _PYTHON_RUN.search(source) is None and _JAVASCRIPT_RUN.search(source) is not None


def _merge(limits: Limits, override: LimitsOverride | None, where: str, at: str) -> Limits:
    if override is None:
        return limits
    changes = {k: v for k, v in msgspec.structs.asdict(override).items() if v is not None}
    for key, value in changes.items():
        if not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"{where}: `{at}.{key}` must be positive")
    return msgspec.structs.replace(limits, **changes)
