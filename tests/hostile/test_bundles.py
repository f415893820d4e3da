"""A step tries to change its dependency bundle (the module it imports, the bundle's directory,
the cache around it) so that a later step, or another customer's, would run its code: under
the full profile (the cache bound read-only into the view) and the Fargate one (no mount
namespace: the cache is root's and not writable by the step's uid)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.runnerd.bundles import runnerd, start_worker, submit_wait, write
from tests.runnerd.conftest import SHARED_REDIS_URL, delete_keys

PY_ATTACK = """import os, dateutil

def run(input, ctx):
    target = dateutil.__file__
    package = os.path.dirname(target)
    cache = os.path.dirname(os.path.dirname(os.path.dirname(package)))
    attempts = {
        "append": lambda: open(target, "a").write("print('owned')"),
        "replace": lambda: os.rename(target, target + ".old"),
        "unlink": lambda: os.unlink(target),
        "chmod": lambda: os.chmod(target, 0o777),
        "create": lambda: open(os.path.join(package, "evil.py"), "w").write("x = 1"),
        "create_in_cache": lambda: os.mkdir(os.path.join(cache, "evil")),
        "list_cache": lambda: os.listdir(cache),
    }
    outcome = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            outcome[name] = "done"
        except OSError as exc:
            outcome[name] = type(exc).__name__
    return outcome
"""
JS_ATTACK = """const fs = require("node:fs");
const path = require("node:path");
module.exports.run = (input) => {
  const target = require.resolve("fast-xml-parser");
  const attempts = {
    append: () => fs.appendFileSync(target, "console.log('owned')"),
    replace: () => fs.renameSync(target, target + ".old"),
    create: () => fs.writeFileSync(path.join(path.dirname(target), "evil.js"), "1"),
  };
  const outcome = {};
  for (const [name, attempt] of Object.entries(attempts)) {
    try { attempt(); outcome[name] = "done"; } catch (err) { outcome[name] = err.code; }
  }
  return { python: input, node: outcome };
};
"""


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    prefix = f"th{uuid.uuid4().hex[:12]}"
    spec = {
        "name": "tamper",
        "dependencies": {
            "npm": {"fast-xml-parser": "4.5.0"},
            "pip": {"python-dateutil": "2.9.0.post0"},
        },
        "steps": [{"name": "py", "code": "py.py"}, {"name": "js", "code": "js.js"}],
    }
    path = write(tmp_path_factory.mktemp("tamper"), spec, {"py.py": PY_ATTACK, "js.js": JS_ATTACK})
    done = runnerd("bundle", "build", str(path), prefix=prefix)
    assert done.returncode == 0, done.stderr
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        yield path, prefix
    finally:
        delete_keys(client, f"{{{prefix}*")
        client.close()


def test_a_step_cannot_change_its_bundle(
    attack: tuple[Path, str], profile: str, tmp_path: Path
) -> None:
    path, prefix = attack
    # Under /var/tmp, not the test's 0700 tmp_path: without a view, the step uids must be
    # able to pass through the cache's parents to read it at all.
    cache = Path("/var/tmp") / f"runnerd-bundles-{uuid.uuid4().hex[:8]}"
    worker = start_worker(tmp_path, prefix, cache, profile=profile)
    try:
        for _ in range(2):  # and the second run finds the bundle as it was
            result = submit_wait(path, prefix, None)
            assert result["status"] == "succeeded", result
            python, node = result["output"]["python"], result["output"]["node"]
            assert "done" not in python.values(), python
            assert "done" not in node.values(), node
        # EACCES (root's files and directories) everywhere; in the view EROFS too (a
        # read-only bind) for what the permissions alone would not decide first.
        assert set(python.values()) <= {"PermissionError", "OSError"}, python
        [bundle] = [p for p in cache.iterdir() if not p.name.startswith(".")]
        module = bundle / "python" / "dateutil" / "__init__.py"
        assert "owned" not in module.read_text()
        assert not (bundle / "python" / "dateutil" / "evil.py").exists()
        assert not (bundle / "node_modules" / "fast-xml-parser" / "src" / "evil.js").exists()
    finally:
        worker.stop()
        shutil.rmtree(cache, ignore_errors=True)
