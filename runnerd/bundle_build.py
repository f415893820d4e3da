"""`runnerd bundle build`: install a declaration's packages into a directory and pack it.

Run where the registries are reachable (a laptop, CI); workers never reach one. The layout a
worker unpacks and steps read: `node_modules/` (npm) and `python/` (pip, on the step's
sys.path).

- npm: `npm ci` with a lock file, `npm install` with inline pins, both `--ignore-scripts`:
  install scripts are arbitrary code of every package in the tree, run on the build machine
  (a CI runner with its credentials), and what they would build (native addons) is nothing
  a step could rely on anyway. `--omit=dev`, no audit, no funding notes.
- pip: `pip install --target python/ --only-binary=:all:` (wheels only: an sdist runs its
  setup.py on the build machine), hashes checked when the requirements carry them, then
  compiled once with `compileall --invalidation-mode unchecked-hash` (byte code without
  timestamps, so the archive stays deterministic, and a step never compiles a dependency:
  the bundle is read-only to it). Scripts in `bin/` are left out.

A failing install names the package the installer complained about.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from runnerd import bundle_archive
from runnerd.bundle_spec import BundleSpec
from runnerd.bundle_store import BundleManifest, chunks_of
from runnerd.errors import RunnerdError

INSTALL_TIMEOUT_S = 600.0


class BuildError(RunnerdError):
    """A package would not install, or the bundle is past its size limit."""


def build(spec: BundleSpec, size_max: int) -> tuple[bytes, BundleManifest]:
    """Install, pack and describe one bundle; BuildError names what went wrong."""
    with tempfile.TemporaryDirectory(prefix="runnerd-bundle-") as work:
        root = Path(work, "bundle")
        root.mkdir()
        if spec.npm is not None:
            _npm(spec, Path(work, "npm"), root)
        if spec.pip is not None:
            _pip(spec, Path(work), root)
        unpacked = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        if unpacked > size_max:
            raise BuildError(_too_large(root, unpacked, size_max))
        try:
            archive = bundle_archive.pack(root)
        except bundle_archive.ArchiveError as exc:
            raise BuildError(f"cannot pack the bundle: {exc}") from exc
    if len(archive) > size_max:
        raise BuildError(
            f"the bundle's archive is {len(archive) / 2**20:.1f} MB, over the limit of "
            f"{size_max // 2**20} MB (RUNNERD_BUNDLE_MAX_MB)"
        )
    manifest = BundleManifest(
        sha256=hashlib.sha256(archive).hexdigest(),
        size=len(archive),
        chunks=chunks_of(len(archive)),
        unpacked_bytes=unpacked,
        python=f"{sys.version_info[0]}.{sys.version_info[1]}" if spec.pip else "",
        packages=[*spec.npm_packages, *spec.pip_packages],
    )
    return archive, manifest


def _npm(spec: BundleSpec, work: Path, root: Path) -> None:
    assert spec.npm is not None
    work.mkdir()
    (work / "package.json").write_text(spec.npm.package_json)
    flags = ["--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund", "--no-update-notifier"]
    if spec.npm.lock:
        (work / "package-lock.json").write_text(spec.npm.lock)
        argv = ["npm", "ci", *flags]
    else:
        argv = ["npm", "install", "--no-package-lock", *flags]
    _install("npm", argv, work, spec.npm_packages)
    modules = work / "node_modules"
    if modules.is_dir():
        shutil.move(str(modules), root / "node_modules")


def _pip(spec: BundleSpec, work: Path, root: Path) -> None:
    assert spec.pip is not None
    requirements = work / "requirements.txt"
    requirements.write_text(spec.pip.requirements)
    target = root / "python"
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--target",
        str(target),
        "--only-binary=:all:",
        "--no-compile",
        "--no-input",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--progress-bar",
        "off",
        "-r",
        str(requirements),
    ]
    _install("pip", argv, work, spec.pip_packages)
    shutil.rmtree(target / "bin", ignore_errors=True)
    compileall = [sys.executable, "-m", "compileall", "-q", "-j", "1", "-s", str(target)]
    compileall += ["--invalidation-mode", "unchecked-hash", str(target)]
    subprocess.run(compileall, capture_output=True, check=False, timeout=INSTALL_TIMEOUT_S)


def _install(tool: str, argv: list[str], cwd: Path, packages: list[str]) -> None:
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise BuildError(f"{tool} is not installed here: {exc.filename} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{tool} did not finish within {INSTALL_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        output = done.stderr + done.stdout
        raise BuildError(f"{tool} could not install {_culprit(output, packages)}: {_gist(output)}")


# What npm and pip say about the package at fault, most specific first.
_NAMED = (
    re.compile(r"404 Not Found - GET \S+/(?P<name>(@[^/\s]+/)?[^/\s]+?)(/-/|\s|$)"),
    re.compile(r"No matching version found for (?P<name>(@[^@\s]+)|[^@\s]+)@"),
    re.compile(r"(?:requirement|distribution found for) (?P<name>[A-Za-z0-9._-]+)"),
    re.compile(r"'(?P<name>(@[^@\s']+)|[^@\s']+)@[^']*' is not in this registry"),
)


def _culprit(output: str, packages: list[str]) -> str:
    for pattern in _NAMED:
        if found := pattern.search(output):
            return f"package {found['name']}"
    named = [name for name in packages if re.search(rf"\b{re.escape(name)}\b", output)]
    return f"package {named[0]}" if len(named) == 1 else "the bundle's packages"


def _gist(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"(npm (ERR!|error)|ERROR:)", line)]
    shown = [re.sub(r"^(npm (ERR!|error)|ERROR:)\s*", "", line) for line in errors or lines]
    return "; ".join(line for line in shown[:3] if line)[:400] or "(no output)"


def _too_large(root: Path, unpacked: int, size_max: int) -> str:
    sizes: dict[str, int] = {}
    for part in ("node_modules", "python"):
        for top in (root / part).glob("*") if (root / part).is_dir() else ():
            scoped = top.name.startswith("@") and top.is_dir()
            tops = list(top.iterdir()) if scoped else [top]
            for package in tops:
                size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
                size = size if package.is_dir() else package.stat().st_size
                sizes[package.relative_to(root / part).as_posix()] = size
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:3]
    named = ", ".join(f"{name} ({size / 2**20:.1f} MB)" for name, size in largest)
    return (
        f"the bundle unpacks to {unpacked / 2**20:.1f} MB, over the limit of "
        f"{size_max // 2**20} MB (RUNNERD_BUNDLE_MAX_MB); largest: {named}"
    )
