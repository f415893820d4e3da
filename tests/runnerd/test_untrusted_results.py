"""What a step hands back is untrusted, all the way to the client: an output of millions of
items fails its step instead of taking down the worker or the client that awaits it, a result
in Redis past the decoding bounds comes back failed, and the code cache never hands one step's
compiled code to another (real `runnerd serve`, real Redis)."""

from __future__ import annotations

import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import msgspec
import redis

from runnerd.client import Client, Result
from runnerd.keys import Keys
from runnerd.messages import ExecutionResult, Integration, StepOutcome, StepReport, encoder
from runnerd.spawner import StepSpec, _code_key
from tests.conftest import ROOT, runnerd_env
from tests.runnerd.conftest import SHARED_REDIS_URL, ServeFactory, run_async, run_one

MB = 1024 * 1024
# [{}] * 16_000_000: 16 MB of msgpack, 1.2 GB of dicts once decoded.
MANY_ITEMS = b"\xdd" + struct.pack(">I", 16_000_000) + b"\x80" * 16_000_000
CLIENT_PEAK_MAX_MB = 64  # the 16 MB read from Redis and what refers to it; decoding was 1200


def inline(name: str, source: str, step: str = "only") -> Integration:
    return Integration.from_dict({"name": name, "steps": [{"name": step, "source": source}]})


def test_huge_item_output_fails_its_step_and_spares_worker_and_client(
    serve: ServeFactory, prefix: str
) -> None:
    daemon = serve()
    integration = inline("many", "def run(input, ctx):\n    return [{}] * 16_000_000\n", "many")

    tracemalloc.start()
    try:
        result = run_one(integration, None, prefix, timeout_s=60)
        peak_mb = tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()

    assert result.status == "failed"
    assert result.failed_step == "many"
    assert result.error is not None and result.error.type == "output_limit", result.error
    assert "more than 2,000,000 items" in result.error.message
    assert peak_mb < CLIENT_PEAK_MAX_MB
    assert daemon.is_alive()
    after = run_one(inline("after", "def run(input, ctx):\n    return input + 1\n"), 41, prefix)
    assert (after.status, after.output) == ("succeeded", 42)


def test_submit_wait_reports_the_output_limit(
    serve: ServeFactory, prefix: str, tmp_path: Path
) -> None:
    serve()
    source = "def run(input, ctx):\n    return [[0] * 100] * 30_000\n"  # 3 M items in 60 KB
    path = tmp_path / "integration.json"
    path.write_text(
        msgspec.json.encode(
            {"name": "many", "steps": [{"name": "many", "source": source}]}
        ).decode()
    )
    done = subprocess.run(
        [sys.executable, "-m", "runnerd", "submit", str(path), "--wait", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env=runnerd_env(REDIS_URL=SHARED_REDIS_URL, RUNNERD_KEY_PREFIX=prefix),
    )

    assert done.returncode == 1, done.stderr
    report = msgspec.json.decode(done.stdout)
    assert report["status"] == "failed"
    assert report["error"]["type"] == "output_limit"
    assert report["steps"][0]["ok"] is False
    assert report["steps"][0]["error"]["type"] == "output_limit"


def forge_result(shared_redis: redis.Redis, prefix: str, output: bytes) -> str:
    """A succeeded result written straight into Redis (as a worker without the bound, say one
    from before it, would), whose output is `output`."""
    keys = Keys(prefix, 1)
    execution_id = keys.new_execution_id(0)
    step = StepReport("last", StepOutcome(ok=True), output_bytes=len(output))
    raw = ExecutionResult(execution_id, "succeeded", msgspec.Raw(output), steps=[step])
    shared_redis.set(keys.result(execution_id), encoder.encode(raw), px=60_000)
    return execution_id


def read_result(prefix: str, execution_id: str) -> Result | None:
    async def go() -> Result | None:
        async with Client.connect(SHARED_REDIS_URL, prefix) as client:
            return await client.result(execution_id)

    result: Result | None = run_async(go())
    return result


def test_result_in_redis_past_the_item_bound_comes_back_failed_unbuilt(
    shared_redis: redis.Redis, prefix: str
) -> None:
    execution_id = forge_result(shared_redis, prefix, MANY_ITEMS)

    tracemalloc.start()
    try:
        result = read_result(prefix, execution_id)
        peak_mb = tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()

    assert result is not None
    assert (result.status, result.output, result.failed_step) == ("failed", None, "last")
    assert result.error is not None and result.error.type == "output_limit"
    assert "more than 2,000,000 items" in result.error.message
    assert len(result.raw.output) == len(MANY_ITEMS)  # the bytes are kept, only not built
    assert peak_mb < CLIENT_PEAK_MAX_MB


def test_result_in_redis_nested_too_deep_comes_back_failed(
    shared_redis: redis.Redis, prefix: str
) -> None:
    deep = forge_result(shared_redis, prefix, b"\x91" * 65 + b"\xc0")
    at_the_bound = forge_result(shared_redis, prefix, b"\x91" * 64 + b"\xc0")

    refused, accepted = read_result(prefix, deep), read_result(prefix, at_the_bound)

    assert refused is not None and refused.error is not None
    assert (refused.status, refused.error.type) == ("failed", "output_limit")
    assert "deeper than 64 levels" in refused.error.message
    assert accepted is not None and accepted.status == "succeeded"


# (source + tail, name) and (source, tail + name) hashed to one key when the fields were simply
# concatenated: the second step ran the code compiled for the first.
SOURCE = "def run(input, ctx):\n    return 'mine'\n"
TAIL = "def run(input, ctx):\n    return 'the other step'\n#"


def test_code_keys_of_equal_concatenations_differ() -> None:
    first = StepSpec("python", "step", SOURCE + TAIL)
    second = StepSpec("python", TAIL + "step", SOURCE)
    assert first.source + first.filename == second.source + second.filename
    assert _code_key(first) != _code_key(second)
    assert _code_key(first) == _code_key(StepSpec("python", "step", SOURCE + TAIL))


def test_steps_with_equal_concatenations_each_run_their_own_code(
    serve: ServeFactory, prefix: str
) -> None:
    serve()  # one worker: one Spawner, one zygote, one code cache
    outputs: list[Any] = []
    for name, source, step in (("other", SOURCE + TAIL, "step"), ("mine", SOURCE, TAIL + "step")):
        result = run_one(inline(name, source, step), None, prefix)
        assert result.status == "succeeded", result.error
        outputs.append(result.output)

    assert outputs == ["the other step", "mine"]
