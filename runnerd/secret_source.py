"""Secrets by reference: where a step's `{"secret": "NAME"}` env value is resolved, and who may
have it. Redis only ever carries the NAME; the value is read here, on the worker, for the
step's child alone (it travels in the StepRequest, straight to that child, never through the
zygote or a warm child), and runnerd/masking.py keeps it from leaving the worker again.

Where a value comes from, in this order:

1. a file NAME in `RUNNERD_SECRETS_DIR` (Docker and Kubernetes secrets), read at each use, so a
   rotated file is seen by the next step (a read of a small file costs ~10 us, a step ~1 ms
   and more; an mtime cache would save little and miss an atomic swap of a link, as
   Kubernetes does it). Its last line break is dropped (`echo` adds one).
2. the variable `RUNNERD_SECRET_<NAME>` of the worker's environment (an ECS task definition
   fills it from Secrets Manager or SSM through its `secrets` field), read once at start: a
   process's environment cannot change from outside.

The file comes first because it can be rotated; a variable is fixed for the worker's life.

A NAME is a letter, then letters, digits and `_` (at most 128): a valid variable name and never
a path (no `/`, no `.`). Who may use one is `RUNNERD_SECRETS_ALLOW`: entries separated by `;`,
each `INTEGRATION=SECRET[,SECRET...]`, where both sides may use `*` as a wildcard (`orders-*=
ACME_*`). No allowlist allows nothing. The allowlist is checked before the secret is looked up,
so an integration that is not allowed a NAME cannot learn whether this worker has it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from runnerd.errors import ConfigError
from sandbox.protocol import StepError

ENV_PREFIX = "RUNNERD_SECRET_"
NAME_MAX = 128
NAME = re.compile(rf"[A-Za-z][A-Za-z0-9_]{{0,{NAME_MAX - 1}}}")
# A value this short would also match ordinary text, masking real output, and is guessed anyway.
VALUE_BYTES_MIN = 8
VALUE_BYTES_MAX = 64 * 1024
_NAME_PATTERN = re.compile(rf"[A-Za-z*][A-Za-z0-9_*]{{0,{NAME_MAX - 1}}}")
_INTEGRATION_PATTERN = re.compile(r"[A-Za-z0-9._*-]{1,200}")
ALLOW_SYNTAX = "INTEGRATION=SECRET[,SECRET...][; ...] (`*` matches any characters)"


class SecretRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A step's env value that names a secret of the worker's instead of carrying a value."""

    secret: str


def name_error(name: str) -> str | None:
    """Why `name` is not a secret's name, or None."""
    if NAME.fullmatch(name):
        return None
    return (
        f"{name!r} is not a secret name (a letter, then letters, digits and _, at most {NAME_MAX})"
    )


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


@dataclass(frozen=True)
class Allowlist:
    """Integration name pattern -> the secret name patterns it may use."""

    entries: tuple[tuple[re.Pattern[str], tuple[re.Pattern[str], ...]], ...] = ()

    def allows(self, integration: str, name: str) -> bool:
        return any(
            who.fullmatch(integration) and any(what.fullmatch(name) for what in names)
            for who, names in self.entries
        )


def parse_allowlist(text: str, source: str = "RUNNERD_SECRETS_ALLOW") -> Allowlist:
    """RUNNERD_SECRETS_ALLOW's text; a bad entry is a ConfigError naming it."""
    entries = []
    for number, entry in enumerate((part.strip() for part in text.split(";")), start=1):
        if not entry:
            continue
        who, equals, what = (side.strip() for side in entry.partition("="))
        names = [name.strip() for name in what.split(",")]
        problem = None
        if not equals or not who or not all(names):
            problem = f"expected {ALLOW_SYNTAX}"
        elif not _INTEGRATION_PATTERN.fullmatch(who):
            problem = f"integration pattern {who!r} may use letters, digits, . _ - and *"
        elif bad := [name for name in names if not _NAME_PATTERN.fullmatch(name)]:
            problem = f"{bad[0]!r} is not a secret name or pattern (letters, digits, _ and *)"
        if problem is not None:
            raise ConfigError(f"{source}: entry {number} ({entry!r}): {problem}")
        entries.append((_wildcard(who), tuple(_wildcard(name) for name in names)))
    return Allowlist(tuple(entries))


def environment_values(environ: Mapping[str, str]) -> dict[str, str]:
    """The RUNNERD_SECRET_<NAME> variables, by NAME; a bad NAME is a ConfigError."""
    values = {}
    for variable, value in environ.items():
        if variable.startswith(ENV_PREFIX):
            name = variable[len(ENV_PREFIX) :]
            if (problem := name_error(name)) is not None:
                raise ConfigError(f"{variable}: {problem}")
            values[name] = value
    return values


@dataclass(frozen=True)
class Resolved:
    """A step's environment with its secrets in, and the values that must not leave."""

    env: dict[str, str]
    values: dict[str, str] = field(default_factory=dict)  # NAME -> value

    def __repr__(self) -> str:  # never a value in a log line or a traceback
        return f"Resolved(secrets={sorted(self.values)})"


class SecretSource:
    """The worker's secrets: its RUNNERD_SECRET_* variables and RUNNERD_SECRETS_DIR."""

    def __init__(
        self,
        environment: Mapping[str, str] | None = None,
        directory: str = "",
        allowlist: Allowlist | None = None,
    ) -> None:
        self._environment = dict(environment or {})
        self.directory = directory
        self.allowlist = allowlist or Allowlist()

    def __repr__(self) -> str:
        return f"SecretSource(names={sorted(self._environment)}, directory={self.directory!r})"

    @classmethod
    def load(cls, environ: Mapping[str, str], directory: str, allow: str) -> SecretSource:
        """From the worker's environment and its settings, at start; ConfigError if bad."""
        if directory and not os.path.isdir(directory):
            raise ConfigError(f"RUNNERD_SECRETS_DIR: {directory!r} is not a directory")
        return cls(environment_values(environ), directory, parse_allowlist(allow))

    def resolve(self, integration: str, env: Mapping[str, str | SecretRef]) -> Resolved | StepError:
        """The step's environment with every reference replaced by its value, or the `secret`
        error of the first that cannot be given (which names it, never a value)."""
        plain: dict[str, str] = {}
        values: dict[str, str] = {}
        for variable, value in env.items():
            if isinstance(value, str):
                plain[variable] = value
                continue
            found = self._value(integration, value.secret)
            if isinstance(found, StepError):
                return found
            plain[variable] = values[value.secret] = found
        return Resolved(plain, values)

    def _value(self, integration: str, name: str) -> str | StepError:
        if (problem := name_error(name)) is not None:  # stored by something other than submit
            return StepError("secret", problem)
        if not self.allowlist.allows(integration, name):
            return StepError(
                "secret",
                f"secret {name} is not allowed for integration {integration!r} on this worker "
                "(RUNNERD_SECRETS_ALLOW)",
            )
        found = self._from_directory(name)
        if found is None:
            found = self._environment.get(name)
        if found is None:
            where = f"no file {name} in {self.directory}, " if self.directory else ""
            return StepError(
                "secret",
                f"secret {name} is not defined on this worker ({where}no {ENV_PREFIX}{name})",
            )
        if isinstance(found, StepError):
            return found
        return _checked(name, found)

    def _from_directory(self, name: str) -> str | StepError | None:
        if not self.directory:
            return None
        path = os.path.join(self.directory, name)  # NAME has no / and no .: never elsewhere
        try:
            with open(path, "rb") as f:
                exposed = _readable_by_steps(self.directory, os.fstat(f.fileno()))
                data = f.read(VALUE_BYTES_MAX + 2)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return StepError("secret", f"secret {name}: cannot read its file: {exc.strerror}")
        if exposed:
            return StepError(
                "secret",
                f"secret {name}: its file in {self.directory} is readable by every user, so a "
                "step could read it itself; make the file 0400 or the directory 0700",
            )
        data = data.removesuffix(b"\n").removesuffix(b"\r")
        try:
            return data.decode()
        except UnicodeDecodeError:
            return StepError("secret", f"secret {name}: its file is not UTF-8 text")


def _readable_by_steps(directory: str, file: os.stat_result) -> bool:
    """Steps run as uids of their own (neither owner nor group here): without a filesystem view
    (Fargate) they reach the directory if others may enter it, and the file if others may
    read it."""
    return bool(os.stat(directory).st_mode & stat.S_IXOTH) and bool(file.st_mode & stat.S_IROTH)


def _checked(name: str, value: str) -> str | StepError:
    size = len(value.encode())
    if size < VALUE_BYTES_MIN:
        return StepError(
            "secret",
            f"secret {name} is shorter than {VALUE_BYTES_MIN} bytes: too short to be masked "
            "reliably",
        )
    if size > VALUE_BYTES_MAX:
        return StepError("secret", f"secret {name} is longer than {VALUE_BYTES_MAX} bytes")
    if "\0" in value:
        return StepError("secret", f"secret {name} contains a NUL byte (an environment cannot)")
    return value
