"""What an integration (or a step) declares it depends on, validated, and the bundle id that
names it.

In an integration file, at the top or in a step (a step's own replaces the integration's):

    "dependencies": {"npm": {"fast-xml-parser": "4.4.1"},        # exact pins, or
                     "npm": "js/package-lock.json",              # package.json beside it
                     "pip": {"python-dateutil": "2.9.0.post0"},  # exact pins, or
                     "pip": "requirements.txt"}                  # every line pinned: ==

The bundle id is the SHA-256 of the declaration in one canonical encoding (pins sorted, lock
files' text as they are), so it is known where the file is read, without installing anything:
the Integration carries only that id, and workers fetch the bundle built under it
(runnerd/bundle_build.py). Once stored, a bundle's content is fixed: a build of the same id is
refused as already stored, so every worker runs the same files (change a pin: a new id).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import msgspec

from runnerd.errors import ConfigError

FORMAT = 1  # of the canonical encoding: a change makes every id new
_NPM_NAME = re.compile(r"(@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*")
_NPM_VERSION = re.compile(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
_PIP_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(\[[A-Za-z0-9,._ -]+\])?")
_PIP_VERSION = re.compile(r"[0-9][0-9A-Za-z.!+_-]*")
# A requirements line: `name==version`, optional extras, markers and --hash options.
_PIP_LINE = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*(?P<version>[0-9][0-9A-Za-z.!+_-]*)"
    r"\s*(;[^-]*)?(\s+--hash=sha256:[0-9a-f]{64})*\s*"
)
LOCK_FILE_MAX = 16 * 1024 * 1024


class Dependencies(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """As written in the file: inline pins, or the path of a lock file."""

    npm: dict[str, str] | str | None = None
    pip: dict[str, str] | str | None = None


class NpmPart(msgspec.Struct, frozen=True, array_like=True):
    package_json: str  # what `npm ci` / `npm install` is given
    lock: str = ""  # package-lock.json's text; "" with inline pins


class PipPart(msgspec.Struct, frozen=True, array_like=True):
    requirements: str  # a requirements.txt, every line pinned


class BundleSpec(msgspec.Struct, frozen=True, array_like=True):
    """A declaration, resolved: what `runnerd bundle build` installs."""

    npm: NpmPart | None = None
    pip: PipPart | None = None
    npm_packages: list[str] = []  # names, for errors
    pip_packages: list[str] = []
    format: int = FORMAT

    @property
    def id(self) -> str:
        canonical = msgspec.msgpack.encode((self.format, self.npm, self.pip))
        return hashlib.sha256(canonical).hexdigest()


def resolve(deps: Dependencies | None, base: Path, where: str, at: str) -> BundleSpec | None:
    """The declaration at `at` (e.g. `$.dependencies`), read and checked; None when empty.
    A ConfigError names the field (and the line of a lock file) at fault."""
    if deps is None or (deps.npm is None and deps.pip is None):
        return None
    npm, npm_names = _npm(deps.npm, base, where, f"{at}.npm")
    pip, pip_names = _pip(deps.pip, base, where, f"{at}.pip")
    return BundleSpec(npm, pip, npm_names, pip_names)


def _npm(
    value: dict[str, str] | str | None, base: Path, where: str, at: str
) -> tuple[NpmPart | None, list[str]]:
    if value is None:
        return None, []
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"{where}: `{at}` pins no package")
        for name, version in value.items():
            if not _NPM_NAME.fullmatch(name):
                raise ConfigError(f"{where}: `{at}`: {name!r} is not an npm package name")
            if not _NPM_VERSION.fullmatch(version):
                raise ConfigError(
                    f"{where}: `{at}.{name}`: {version!r} is not an exact version (e.g. 4.4.1): "
                    "pins make the bundle the same on every build"
                )
        package = {
            "name": "runnerd-bundle",
            "private": True,
            "dependencies": dict(sorted(value.items())),
        }
        return NpmPart(msgspec.json.encode(package).decode()), sorted(value)
    lock_path = base / value
    if lock_path.name != "package-lock.json":
        raise ConfigError(
            f"{where}: `{at}`: a lock file is named package-lock.json, not {lock_path.name!r}"
        )
    lock = _read(lock_path, where, at)
    package_json = _read(lock_path.with_name("package.json"), where, at)
    try:
        names = sorted(msgspec.json.decode(package_json).get("dependencies", {}))
        msgspec.json.decode(lock)
    except (msgspec.DecodeError, AttributeError) as exc:
        raise ConfigError(f"{where}: `{at}`: {lock_path.parent}: not valid JSON: {exc}") from exc
    return NpmPart(package_json, lock), names


def _pip(
    value: dict[str, str] | str | None, base: Path, where: str, at: str
) -> tuple[PipPart | None, list[str]]:
    if value is None:
        return None, []
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"{where}: `{at}` pins no package")
        for name, version in value.items():
            if not _PIP_NAME.fullmatch(name):
                raise ConfigError(f"{where}: `{at}`: {name!r} is not a pip package name")
            if not _PIP_VERSION.fullmatch(version):
                raise ConfigError(
                    f"{where}: `{at}.{name}`: {version!r} is not an exact version (e.g. 2.9.0)"
                )
        text = "".join(f"{name}=={version}\n" for name, version in sorted(value.items()))
        return PipPart(text), sorted(value)
    path = base / value
    text = _read(path, where, at)
    names = []
    for number, line in enumerate(_logical_lines(text), start=1):
        found = _PIP_LINE.fullmatch(line)
        if found is None:
            raise ConfigError(
                f"{where}: `{at}`: {path.name} line {number}: {line.strip()[:80]!r} is not "
                "pinned as name==version (options, URLs and editable installs are refused)"
            )
        names.append(found["name"])
    if not names:
        raise ConfigError(f"{where}: `{at}`: {path.name} lists no requirement")
    return PipPart(text), sorted(names)


def _logical_lines(text: str) -> list[str]:
    """Requirement lines with comments dropped and `\\` continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    lines = (re.sub(r"(^|\s)#.*", "", line) for line in joined.splitlines())
    return [line for line in lines if line.strip()]


def _read(path: Path, where: str, at: str) -> str:
    try:
        if path.stat().st_size > LOCK_FILE_MAX:
            raise ConfigError(f"{where}: `{at}`: {path} is over {LOCK_FILE_MAX // 2**20} MB")
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: `{at}`: cannot read {str(path)!r}: {exc}") from exc
