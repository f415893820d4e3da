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

A loop is a step with `for_each` instead of code: it runs its own steps once per item of an
array taken from its input, and outputs the list of item results in item order:

    {"name": "each", "for_each": {"items": "files", "parallelism": 8,
                                  "on_item_error": "collect", "retries": 1,
                                  "steps": [{"name": "parse", "code": "parse.py"}]}}

`items` is a path into the input (`$`, the default, is the input itself; `files.0.names` goes
through maps by key and arrays by index). Loops do not nest.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import msgspec

from runnerd import bundle_spec
from runnerd.bundle_spec import Dependencies
from runnerd.errors import ConfigError
from runnerd.secret_source import SecretRef, name_error
from sandbox.protocol import Limits, Runtime

_encoder = msgspec.msgpack.Encoder()
OnItemError = Literal["fail", "collect", "skip"]
StepKind = Runtime | Literal["loop"]


class StepDefinition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A step as it travels with an execution: code inline, limits resolved."""

    name: str
    runtime: StepKind  # "loop": a for_each step, which runs no code of its own
    filename: str
    source: str = ""
    argv: list[str] = []
    limits: Limits = Limits()
    env: dict[str, str | SecretRef] = {}  # a SecretRef is resolved by the worker (secret_source.py)
    for_each: Loop | None = None
    bundle: str = ""  # the id of its dependency bundle (runnerd/bundle_spec.py), never its files


class Loop(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A for_each step's loop, resolved. `parallelism` 0: the worker's default.
    `max_items` 0: the worker's limit alone (RUNNERD_LOOP_ITEMS_MAX)."""

    items: str
    steps: list[StepDefinition]
    parallelism: int = 0
    on_item_error: OnItemError = "fail"
    retries: int = 0
    distribute: bool = False
    max_items: int = 0

    def path(self) -> list[str]:
        """`items` as the keys and indices it goes through (none: the whole input)."""
        return [] if self.items == "$" else self.items.removeprefix("$.").split(".")


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
PARALLELISM_MAX = 1024
_ITEMS_PATH = re.compile(r"\$|(\$\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


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
    env: dict[str, str | SecretRef] = {}
    for_each: LoopFile | None = None
    dependencies: Dependencies | None = None


class LoopFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    steps: list[StepFile]
    items: str = "$"
    parallelism: int | None = None
    on_item_error: OnItemError = "fail"
    retries: int = 0
    distribute: bool = False
    max_items: int | None = None


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
    "$.steps[].for_each": (LoopFile, "a for_each loop"),
    "$.steps[].for_each.steps[]": (StepFile, "a step"),
    "$.steps[].for_each.steps[].limits": (LimitsOverride, "limits"),
    "$.steps[].for_each.steps[].for_each": (LoopFile, "a for_each loop"),
    "$.steps[].env[...]": (SecretRef, "a secret reference"),
    "$.dependencies": (Dependencies, "dependencies"),
    "$.steps[].dependencies": (Dependencies, "dependencies"),
}
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`(?: - at `(?P<at>[^`]+)`)?")
_ENUM = re.compile(r"Invalid enum value (?P<value>.+?) - at `(?P<at>[^`]+)`")
_BYTE = re.compile(r"\(byte (?P<offset>\d+)\)")
_ENV_VALUE = re.compile(r"Expected `str \| object`, got `(?P<got>\w+)` - at `(?P<at>[^`]+)`")


def explain(message: str, text: bytes | None = None) -> str:
    """msgspec's message with what the author needs added: the field they meant, the values a
    field takes, and a line and column for a byte offset."""
    if found := _UNKNOWN.fullmatch(message):
        return _unknown_field(found["field"], found["at"] or "$")
    if found := _ENV_VALUE.fullmatch(message):
        got = found["got"]
        return f'`{found["at"]}`: an env value is a string or {{"secret": NAME}}, not {got}'
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
    if typing.get_origin(hint) is Literal:  # a Literal of its own, not one inside `| None`
        choices = [str(v) for v in typing.get_args(hint)]
    else:
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
    if not 0 <= spec.retries <= RETRIES_MAX:
        raise ConfigError(f"{where}: `$.retries` must be between 0 and {RETRIES_MAX}")
    base_limits = _merge(Limits(), spec.limits, where, "$.limits")
    steps = _resolve_steps(spec.steps, base, base_limits, where, "$.steps")
    bundles = bundle_specs(spec, base, where)
    steps = [_with_bundles(step, bundles) for step in steps]
    return Integration(name=spec.name, steps=steps, retries=spec.retries)


def _with_bundles(step: StepDefinition, bundles: dict[str, str]) -> StepDefinition:
    """The step with its bundle id; a loop's steps with theirs (named `loop.step`)."""
    if step.for_each is None:
        return msgspec.structs.replace(step, bundle=bundles.get(step.name, ""))
    inner = [
        msgspec.structs.replace(s, bundle=bundles.get(f"{step.name}.{s.name}", ""))
        for s in step.for_each.steps
    ]
    return msgspec.structs.replace(
        step, for_each=msgspec.structs.replace(step.for_each, steps=inner)
    )


def _resolve_steps(
    steps: list[StepFile], base: Path, limits: Limits, where: str, at: str
) -> list[StepDefinition]:
    if not steps:
        raise ConfigError(f"{where}: `{at}` must list at least one step")
    names = [step.name for step in steps]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{where}: step names must be unique; repeated: {', '.join(duplicates)}")
    return [
        _resolve_step(step, base, limits, where, f"{at}[{index}]")
        for index, step in enumerate(steps)
    ]


def _resolve_loop(
    step: StepFile, loop: LoopFile, base: Path, limits: Limits, where: str, at: str
) -> StepDefinition:
    others = [
        field
        for field in ("code", "source", "runtime", "exec", "limits", "network")
        if getattr(step, field) is not None
    ] + (["env"] if step.env else [])
    if others:
        raise ConfigError(
            f"{where}: `{at}` is a for_each loop and runs no code of its own; move "
            f"{', '.join(others)} into the steps of `{at}.for_each`"
        )
    at = f"{at}.for_each"
    if not _ITEMS_PATH.fullmatch(loop.items):
        raise ConfigError(
            f"{where}: `{at}.items` must be `$` (the whole input) or a path of keys and "
            f"indices such as `files` or `$.batch.files`, not {loop.items!r}"
        )
    if loop.parallelism is not None and not 1 <= loop.parallelism <= PARALLELISM_MAX:
        raise ConfigError(f"{where}: `{at}.parallelism` must be between 1 and {PARALLELISM_MAX}")
    if not 0 <= loop.retries <= RETRIES_MAX:
        raise ConfigError(f"{where}: `{at}.retries` must be between 0 and {RETRIES_MAX}")
    if loop.max_items is not None and loop.max_items < 1:
        raise ConfigError(f"{where}: `{at}.max_items` must be positive")
    for index, inner in enumerate(loop.steps):
        if inner.for_each is not None:
            raise ConfigError(
                f"{where}: `{at}.steps[{index}]`: loops do not nest; run the inner loop in "
                "a step of its own, or as an integration of its own"
            )
    return StepDefinition(
        step.name,
        "loop",
        step.name,
        limits=limits,
        for_each=Loop(
            items=loop.items,
            steps=_resolve_steps(loop.steps, base, limits, where, f"{at}.steps"),
            parallelism=loop.parallelism or 0,
            on_item_error=loop.on_item_error,
            retries=loop.retries,
            distribute=loop.distribute,
            max_items=loop.max_items or 0,
        ),
    )


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
        at = f"$.steps[{index}]"
        own = bundle_spec.resolve(step.dependencies, base, where, f"{at}.dependencies")
        if step.for_each is not None:  # a loop runs none itself; its steps do
            for inner_index, inner in enumerate(step.for_each.steps):
                inner_at = f"{at}.for_each.steps[{inner_index}].dependencies"
                inner_own = bundle_spec.resolve(inner.dependencies, base, where, inner_at)
                if inner.exec is None and (inner_own or own or shared):
                    found[f"{step.name}.{inner.name}"] = inner_own or own or shared
        elif step.exec is None and (own or shared):
            found[step.name] = own or shared
    return {name: value for name, value in found.items() if value is not None}


def _resolve_step(
    step: StepFile, base: Path, limits: Limits, where: str, at: str
) -> StepDefinition:
    if step.for_each is not None:
        return _resolve_loop(step, step.for_each, base, limits, where, at)
    kinds = [kind for kind in ("code", "source", "exec") if getattr(step, kind) is not None]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: `{at}` needs exactly one of code, source, exec or for_each")
    limits = _merge(limits, step.limits, where, f"{at}.limits")
    _check_secret_names(step, where, at)
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


def _check_secret_names(step: StepFile, where: str, at: str) -> None:
    for variable, value in step.env.items():
        if isinstance(value, SecretRef) and (problem := name_error(value.secret)) is not None:
            raise ConfigError(f"{where}: `{at}.env.{variable}.secret`: {problem}")


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
