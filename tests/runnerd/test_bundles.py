"""Dependency bundles end to end: real `npm install` and `pip install` into a bundle by
`runnerd bundle build`, real workers with caches of their own fetching it from Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from runnerd.keys import Keys
from tests.runnerd.bundles import (
    DEPENDENCIES,
    EXPECTED,
    JS_STEP,
    STEP_FILES,
    XML_INPUT,
    bundle_dirs,
    parse_and_date,
    runnerd,
    start_worker,
    submit_wait,
    write,
)
from tests.runnerd.conftest import SHARED_REDIS_URL, Daemon, delete_keys

LODASH_FILE = "integration.json"  # in the `lodash` directory beside the `built` one
LODASH = {
    "name": "chunks",
    "dependencies": {"npm": {"lodash": "4.17.21"}},  # 1.4 MB unpacked
    "steps": [
        {
            "name": "chunk",
            "runtime": "node",
            "source": "const _ = require('lodash');\n"
            "module.exports.run = () => _.chunk([1, 2, 3], 2);",
        }
    ],
}
# A loop's sub-steps, each saying which bundle it found its package in. dateutil is also in
# runnerd's own environment (a dependency of a dev tool), so importing it proves nothing: the
# step names the bundle the module came from (`<cache>/<bundle id>/python/dateutil/...`).
DATEUTIL_BUNDLE = """import pathlib
import dateutil.parser

def run(input, ctx):
    assert dateutil.parser.parse("2024-03-01").year == 2024
    return {**input, ctx.step.split(".")[-1]: pathlib.Path(dateutil.__file__).parents[2].name}
"""
LODASH_CHUNK = """const _ = require("lodash");
module.exports.run = (input) => ({ ...input, loop_level: _.chunk([1, 2, 3], 2) });
"""


def loop_levels() -> dict[str, object]:
    """Every level of a loop's dependencies, reusing the bundles `built` stores (the same
    declarations: the same ids): sub-step `own` declares its own (the integration's pins),
    `loop_level` has the loop step's (lodash), and the second loop's `shared` the
    integration's."""
    return {
        "name": "levels",
        "dependencies": DEPENDENCIES,
        "steps": [
            {
                "name": "each",
                "dependencies": LODASH["dependencies"],
                "for_each": {
                    "steps": [
                        {"name": "own", "source": DATEUTIL_BUNDLE, "dependencies": DEPENDENCIES},
                        {"name": "loop_level", "runtime": "node", "source": LODASH_CHUNK},
                    ]
                },
            },
            {
                "name": "again",
                "for_each": {"steps": [{"name": "shared", "source": DATEUTIL_BUNDLE}]},
            },
        ],
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One integration with both kinds of dependencies, its bundle built once for the module,
    under a key prefix of the module's own (and a second, larger one: `lodash_path`)."""
    prefix = f"tb{uuid.uuid4().hex[:12]}"
    path = write(tmp_path_factory.mktemp("bundled"), parse_and_date(), STEP_FILES)
    lodash = write(path.parent / "lodash", LODASH)
    for each in (path, lodash):
        done = runnerd("bundle", "build", str(each), prefix=prefix)
        assert done.returncode == 0, done.stderr
        assert "built and stored" in done.stdout
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        yield path, prefix
    finally:
        delete_keys(client, f"{{{prefix}*")
        client.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def test_two_workers_sharing_no_disk_run_js_and_python_packages(
    built: tuple[Path, str], tmp_path: Path, workers: list[Daemon]
) -> None:
    path, prefix = built
    caches = [tmp_path / "cache-a", tmp_path / "cache-b"]
    workers += [start_worker(tmp_path, prefix, cache) for cache in caches]
    for _ in range(40):  # until each worker has taken one (they read the stream in turns)
        result = submit_wait(path, prefix, XML_INPUT)
        assert result["status"] == "succeeded", result
        assert result["output"] == EXPECTED
        if all(bundle_dirs(cache) for cache in caches):
            break
    # Each worker fetched the bundle into its own cache, from Redis alone.
    assert all(len(bundle_dirs(cache)) == 1 for cache in caches)
    assert all("fetched and unpacked" in daemon.log() for daemon in workers)


def test_the_cache_survives_a_worker_restart(
    built: tuple[Path, str], tmp_path: Path, workers: list[Daemon]
) -> None:
    path, prefix = built
    cache = tmp_path / "cache"
    workers.append(start_worker(tmp_path, prefix, cache))
    assert submit_wait(path, prefix, XML_INPUT)["status"] == "succeeded"
    workers[0].stop()
    workers.append(start_worker(tmp_path, prefix, cache))
    result = submit_wait(path, prefix, XML_INPUT)
    assert result["status"] == "succeeded", result
    assert "fetched and unpacked" in workers[0].log()
    assert "fetched and unpacked" not in workers[1].log()  # found unpacked already


def test_the_least_recently_used_bundle_is_evicted_past_the_cap(
    built: tuple[Path, str], tmp_path: Path, workers: list[Daemon]
) -> None:
    path, prefix = built
    other = path.parent / "lodash" / LODASH_FILE
    cache = tmp_path / "cache"
    workers.append(start_worker(tmp_path, prefix, cache, bundle_cache_mb=1))
    assert submit_wait(path, prefix, XML_INPUT)["status"] == "succeeded"
    first = bundle_dirs(cache)
    result = submit_wait(other, prefix, None)
    assert result["status"] == "succeeded" and result["output"] == [[1, 2], [3]], result
    assert len(bundle_dirs(cache)) == 1 and bundle_dirs(cache) != first  # the first went
    assert "evicted" in workers[0].log()
    assert submit_wait(path, prefix, XML_INPUT)["status"] == "succeeded"  # fetched again


def test_submit_refuses_an_integration_whose_bundle_is_not_stored(
    tmp_path: Path, prefix: str
) -> None:
    path = write(tmp_path, parse_and_date(dependencies={"npm": {"ms": "2.1.2"}}), STEP_FILES)
    done = runnerd("submit", str(path), prefix=prefix)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"runnerd bundle build {path}" in lines[0] and "not stored" in lines[0]


def test_a_bundle_gone_at_run_time_fails_the_step_clearly(
    built: tuple[Path, str], tmp_path: Path, workers: list[Daemon]
) -> None:
    path, prefix = built
    keys = Keys(prefix, 1)
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    bundle_id = _bundle_id(path)
    saved = client.dump(keys.bundle_manifest(bundle_id))
    try:
        submitted = runnerd("submit", str(path), "--input", "{}", prefix=prefix)
        client.delete(keys.bundle_manifest(bundle_id))  # then deleted by an operator
        workers.append(start_worker(tmp_path, prefix, tmp_path / "cache"))
        done = runnerd("result", submitted.stdout.strip(), "--wait", prefix=prefix)
        result = json.loads(done.stdout)
    finally:
        client.restore(keys.bundle_manifest(bundle_id), 0, saved, replace=True)
        client.close()
    assert result["status"] == "failed"
    assert result["error"]["type"] == "bundle"
    assert "is not stored" in result["error"]["message"]
    assert "runnerd bundle build" in result["error"]["message"]
    assert workers[0].is_alive()


def test_a_bundle_that_fails_its_hash_check_is_refused(
    built: tuple[Path, str], tmp_path: Path, workers: list[Daemon]
) -> None:
    path, prefix = built
    keys = Keys(prefix, 1)
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    [chunk] = list(client.scan_iter(match=f"{keys.bundle_tag(_bundle_id(path))}:chunk:*"))
    original = client.get(chunk)
    assert original is not None
    client.set(chunk, original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
    try:
        workers.append(start_worker(tmp_path, prefix, tmp_path / "cache"))
        result = submit_wait(path, prefix, XML_INPUT)
    finally:
        client.set(chunk, original)
        client.close()
    assert result["status"] == "failed"
    assert result["error"]["type"] == "bundle"
    assert "failed its hash check" in result["error"]["message"]
    assert "fast-xml-parser" in result["error"]["message"]
    assert bundle_dirs(tmp_path / "cache") == []


def test_a_bundle_past_the_workers_size_limit_is_refused(
    built: tuple[Path, str], tmp_path: Path, workers: list[Daemon]
) -> None:
    path, prefix = built
    workers.append(start_worker(tmp_path, prefix, tmp_path / "cache", bundle_max_mb=1))
    result = submit_wait(path.parent / "lodash" / "integration.json", prefix, None)
    assert result["error"]["type"] == "bundle", result
    assert "over this worker's limit of 1 MB" in result["error"]["message"]
    assert "lodash" in result["error"]["message"]


def test_a_build_past_the_size_limit_names_the_largest_packages(
    built: tuple[Path, str], tmp_path: Path
) -> None:
    path, _ = built
    lodash = path.parent / "lodash" / "integration.json"
    done = runnerd(
        "bundle",
        "build",
        str(lodash),
        prefix=f"tb{uuid.uuid4().hex[:12]}",
        RUNNERD_BUNDLE_MAX_MB="1",
    )
    assert done.returncode == 1
    assert "over the limit of 1 MB (RUNNERD_BUNDLE_MAX_MB)" in done.stderr
    assert "largest: lodash (" in done.stderr


@pytest.mark.parametrize("tool", ["npm", "pip"])
def test_a_package_that_fails_to_install_is_named(tool: str, tmp_path: Path, prefix: str) -> None:
    missing = "runnerd-no-such-package-4f1c"
    path = write(tmp_path, parse_and_date(dependencies={tool: {missing: "1.0.0"}}), STEP_FILES)
    done = runnerd("bundle", "build", str(path), prefix=prefix)
    assert done.returncode == 1
    assert f"{tool} could not install package {missing}" in done.stderr, done.stderr


def test_a_loops_sub_steps_get_their_own_bundle_else_the_loops_else_the_integrations(
    built: tuple[Path, str], tmp_path: Path, workers: list[Daemon]
) -> None:
    shared_path, prefix = built
    pins, lodash = _bundle_id(shared_path), _bundle_id(shared_path.parent / "lodash" / LODASH_FILE)
    path = write(tmp_path / "levels", loop_levels())
    workers.append(start_worker(tmp_path, prefix, tmp_path / "cache"))

    result = submit_wait(path, prefix, [{"n": 1}, {"n": 2}])

    # `own` imported dateutil from its own bundle (the loop's has only lodash), `loop_level`
    # required lodash from the loop's (the integration's has none), `shared` imported
    # dateutil from the integration's (its loop declares nothing).
    assert result["status"] == "succeeded", result
    chunked = [[1, 2], [3]]
    assert result["output"] == [
        {"n": n, "own": pins, "loop_level": chunked, "shared": pins} for n in (1, 2)
    ]
    assert lodash != pins
    assert len(bundle_dirs(tmp_path / "cache")) == 2  # lodash, and the shared pins once


def test_submit_refuses_a_loop_whose_sub_steps_bundle_is_not_stored(
    tmp_path: Path, prefix: str, shared_redis: redis.Redis
) -> None:
    step = {"name": "parse", "code": "parse.js", "dependencies": {"npm": {"ms": "2.1.2"}}}
    spec = {"name": "orders", "steps": [{"name": "each", "for_each": {"steps": [step]}}]}
    path = write(tmp_path, spec, {"parse.js": JS_STEP})

    done = runnerd("submit", str(path), "--input", "[]", prefix=prefix)

    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "the dependency bundle of step(s) each.parse (" in lines[0]
    assert "is not stored" in lines[0] and f"runnerd bundle build {path}" in lines[0]
    assert shared_redis.exists(Keys(prefix, 1).work(0)) == 0  # nothing was enqueued


def _bundle_id(path: Path) -> str:
    from runnerd.integration import Integration

    return Integration.load(path).steps[0].bundle
