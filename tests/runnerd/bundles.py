"""Helpers of the bundle tests: integrations with real npm and pip dependencies, built once per
module with `runnerd bundle build`, and `runnerd serve` workers with caches of their own (under
the full profile or the Fargate one)."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from tests.conftest import FARGATE_LAUNCHER, ROOT, runnerd_env
from tests.runnerd.conftest import SHARED_REDIS_URL, Daemon

DEPENDENCIES = {"npm": {"fast-xml-parser": "4.5.0"}, "pip": {"python-dateutil": "2.9.0.post0"}}
JS_STEP = """const { XMLParser } = require("fast-xml-parser");
module.exports.run = (input) => new XMLParser().parse(input.xml);
"""
# runnerd's own environment may hold python-dateutil too (matplotlib, of the test extra, needs
# it), and a step can import from it: where the module came from says the bundle provided it.
PY_STEP = """import os
import dateutil.parser

def run(input, ctx):
    year = dateutil.parser.parse("2024-03-01T10:00").year
    bundled = os.path.dirname(dateutil.__file__).endswith("/python/dateutil")
    return {"order": input["order"], "year": year, "from_bundle": bundled}
"""
XML_INPUT = {"xml": "<order><id>7</id></order>"}
EXPECTED = {"order": {"id": 7}, "year": 2024, "from_bundle": True}
_UIDS = itertools.count()


def write(directory: Path, spec: dict[str, Any], files: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
    path = directory / "integration.json"
    path.write_text(json.dumps(spec))
    return path


def parse_and_date(name: str = "orders", dependencies: Any = None) -> dict[str, Any]:
    """A JavaScript step parsing XML with fast-xml-parser, then a Python step with dateutil."""
    return {
        "name": name,
        "dependencies": DEPENDENCIES if dependencies is None else dependencies,
        "steps": [
            {"name": "parse", "code": "parse.js"},
            {"name": "date", "code": "date.py"},
        ],
    }


STEP_FILES = {"parse.js": JS_STEP, "date.py": PY_STEP}


def runnerd(*args: str, prefix: str, timeout_s: float = 300, **env: str) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "runnerd", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env=runnerd_env(REDIS_URL=SHARED_REDIS_URL, RUNNERD_KEY_PREFIX=prefix, **env),
    )


def start_worker(
    log_dir: Path, prefix: str, cache_dir: Path, profile: str = "full", **settings: Any
) -> Daemon:
    """`runnerd serve` with its own bundle cache and step uids, waiting until it serves."""
    base = int(os.environ.get("RUNNERD_TEST_UID_BASE", "900000")) + 20_000
    env = runnerd_env(
        REDIS_URL=SHARED_REDIS_URL,
        RUNNERD_KEY_PREFIX=prefix,
        RUNNERD_POOL_SIZE="1",
        RUNNERD_DRAIN_S="2",
        RUNNERD_CONCURRENCY="4",
        RUNNERD_SANDBOX_SLOTS="16",
        RUNNERD_SANDBOX_UID_BASE=str(base + 100 * (next(_UIDS) % 50)),
        RUNNERD_HTTP_PORT="0",
        RUNNERD_BUNDLE_CACHE_DIR=str(cache_dir),
    )
    env.update({f"RUNNERD_{name.upper()}": str(value) for name, value in settings.items()})
    argv = [sys.executable, "-m", "runnerd", "serve"]
    if profile == "fargate":
        argv = [sys.executable, str(FARGATE_LAUNCHER), *argv]
    log_path = log_dir / f"serve-{os.urandom(3).hex()}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    daemon = Daemon(process, log_path)
    daemon.wait_serving()
    return daemon


def submit_wait(path: Path, prefix: str, data: Any, timeout_s: float = 60) -> dict[str, Any]:
    done = runnerd(
        "submit",
        str(path),
        "--input",
        json.dumps(data),
        "--wait",
        "--timeout",
        str(timeout_s),
        prefix=prefix,
    )
    assert done.stdout.strip(), done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def bundle_dirs(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))


def tar_of(*members: tuple[tarfile.TarInfo, bytes], compress: bool = True) -> bytes:
    """A tar archive of these members and contents, gzipped as a bundle's is unless not
    `compress` (a hostile test splices raw blocks). GNU format: a member is written as asked
    (long names, odd types, modes), which is what the tests of unpacking need."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, content in members:
            info.size = len(content) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(content) if info.isfile() else None)
    return gzip.compress(raw.getvalue()) if compress else raw.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)  # mode 0644
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info
