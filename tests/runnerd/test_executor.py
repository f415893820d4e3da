"""Executions through a real `runnerd serve`: data flowing step to step over the three runtimes,
a 64 MB payload, a failing step, retries with backoff, dead letters."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis

from runnerd.keys import GROUP, Keys
from runnerd.messages import Execution, Integration
from tests.runnerd.conftest import (
    SHARED_REDIS_URL,
    ServeFactory,
    counting_input,
    counting_integration,
    run_async,
    run_counts,
    run_one,
    submit_all,
    wait_all,
    wait_for,
    write_integration,
)

MB = 1024 * 1024

# Six steps over the three runtimes; each transforms the previous step's output, so the final
# value is only right if every step ran once, in order, on its predecessor's output.
CHAIN_FILES = {
    "parse.py": (
        "def run(input, ctx):\n"
        "    ctx.log.info(f'parsing {len(input[\"words\"])} words')\n"
        "    return {'words': input['words'], 'n': len(input['words']),\n"
        "            'id': ctx.execution_id, 'trail': ['parse']}\n"
    ),
    "upper.mjs": (
        "export function run(input, ctx) {\n"
        "  ctx.log.info(`upper at ${ctx.step}`);\n"
        "  return { ...input, words: input.words.map((w) => w.toUpperCase()),\n"
        "           trail: [...input.trail, ctx.step] };\n"
        "}\n"
    ),
    "lengths.mjs": (
        "export async function run(input, ctx) {\n"
        "  await new Promise((resolve) => setTimeout(resolve, 1));\n"
        "  return { ...input, lengths: input.words.map((w) => w.length),\n"
        "           trail: [...input.trail, ctx.step] };\n"
        "}\n"
    ),
    "pack.py": (
        "def run(input, ctx):\n"
        "    blob = '-'.join(input['words']).encode()\n"
        "    return {**input, 'blob': blob, 'trail': input['trail'] + [ctx.step]}\n"
    ),
    "unpack.mjs": (
        "export function run(input, ctx) {\n"
        "  const text = new TextDecoder().decode(input.blob);\n"
        "  return { ...input, blob: undefined, joined: text, bytes: input.blob.length,\n"
        "           trail: [...input.trail, ctx.step] };\n"
        "}\n"
    ),
}
SUM_EXEC = (
    "import json, sys\n"
    "o = json.load(sys.stdin)\n"
    "print(json.dumps({'joined': o['joined'], 'total': sum(o['lengths']), 'n': o['n'],\n"
    "                  'bytes': o['bytes'], 'id': o['id'], 'trail': o['trail'] + ['sum']}))\n"
)


def chain_integration(tmp_path: Path) -> Integration:
    spec = {
        "name": "six-steps",
        "steps": [
            {"name": "parse", "code": "parse.py"},
            {"name": "upper", "code": "upper.mjs"},
            {"name": "lengths", "code": "lengths.mjs"},
            {"name": "pack", "code": "pack.py"},
            {"name": "unpack", "code": "unpack.mjs"},
            {"name": "sum", "exec": ["python3", "-c", SUM_EXEC]},
        ],
    }
    return Integration.load(write_integration(tmp_path / "chain", spec, CHAIN_FILES))


def step_output(report: Any) -> Any:
    return msgspec.msgpack.decode(report.outcome.output)


def test_six_steps_three_runtimes_pass_data_through_every_step(
    serve: ServeFactory, prefix: str, tmp_path: Path
) -> None:
    serve()
    result = run_one(chain_integration(tmp_path), {"words": ["ab", "cde", "f"]}, prefix)

    assert result.status == "succeeded", (result.error, result.failed_step)
    assert result.output == {
        "joined": "AB-CDE-F",
        "total": 6,
        "n": 3,
        "bytes": 8,
        "id": result.execution_id,
        "trail": ["parse", "upper", "lengths", "pack", "unpack", "sum"],
    }
    assert result.attempts == 1
    assert [report.name for report in result.steps] == [
        "parse",
        "upper",
        "lengths",
        "pack",
        "unpack",
        "sum",
    ]
    assert all(report.outcome.ok and report.outcome.error is None for report in result.steps)
    assert all(report.output_bytes > 0 for report in result.steps)
    assert all("seccomp" in report.outcome.layers for report in result.steps)
    parse, upper, lengths, pack, unpack, total = result.steps
    assert parse.outcome.logs == ["INFO parsing 3 words"]
    assert upper.outcome.logs == ["INFO upper at upper"]
    assert step_output(upper)["words"] == ["AB", "CDE", "F"]
    assert step_output(lengths)["lengths"] == [2, 3, 1]
    assert step_output(pack)["blob"] == b"AB-CDE-F"  # bytes crossed from Python to node
    assert step_output(unpack)["joined"] == "AB-CDE-F"
    assert step_output(total) == result.output
    assert total.output_bytes == len(result.raw.output)


# A 64 MB bytes payload through two steps (Python, then node) and a third that digests it.
BIG_FILES = {
    "flip.py": (
        "def run(input, ctx):\n"
        "    table = bytes(range(255, -1, -1))\n"
        "    return {'blob': input['blob'].translate(table), 'seen': [len(input['blob'])]}\n"
    ),
    "bump.mjs": (
        "export function run(input, ctx) {\n"
        "  const blob = input.blob;\n"
        "  for (let i = 0; i < blob.length; i += 4096) blob[i] = (blob[i] + 1) & 255;\n"
        "  return { blob, seen: [...input.seen, blob.length] };\n"
        "}\n"
    ),
    "digest.py": (
        "import hashlib\n"
        "def run(input, ctx):\n"
        "    return {'sha256': hashlib.sha256(input['blob']).hexdigest(),\n"
        "            'seen': input['seen'] + [len(input['blob'])]}\n"
    ),
}


def expected_big_digest(blob: bytes) -> str:
    flipped = bytearray(blob.translate(bytes(range(255, -1, -1))))
    for index in range(0, len(flipped), 4096):
        flipped[index] = (flipped[index] + 1) & 255
    return hashlib.sha256(flipped).hexdigest()


def test_64_mb_payload_end_to_end_stream_entry_stays_small(
    serve: ServeFactory, prefix: str, tmp_path: Path, shared_redis: redis.Redis
) -> None:
    spec = {
        "name": "big",
        "limits": {"wall_s": 60},
        "steps": [
            {"name": "flip", "code": "flip.py"},
            {"name": "bump", "code": "bump.mjs"},
            {"name": "digest", "code": "digest.py"},
        ],
    }
    integration = Integration.load(write_integration(tmp_path / "big", spec, BIG_FILES))
    blob = bytes(range(256)) * (64 * MB // 256)
    expected = expected_big_digest(blob)

    # Submitted before any worker runs, so the entry can be looked at on the stream.
    (execution_id,) = run_async(submit_all(SHARED_REDIS_URL, prefix, integration, [{"blob": blob}]))
    del blob  # the test process keeps no more copies than it needs
    work = Keys(prefix, 1).work(0)
    entries = shared_redis.xrange(work)
    assert len(entries) == 1
    assert sum(len(k) + len(v) for k, v in entries[0][1].items()) < 512
    assert shared_redis.strlen(Keys(prefix, 1).input(execution_id)) > 64 * MB

    daemon = serve()
    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=90))
    assert result.status == "succeeded", (result.error, result.failed_step)
    assert result.output == {"sha256": expected, "seen": [64 * MB] * 3}
    flip, bump, _ = result.steps
    for report in (flip, bump):
        assert report.output_bytes > 64 * MB
        assert bytes(report.outcome.output) == msgspec.msgpack.encode(None)  # too big to keep
    assert shared_redis.xlen(work) == 0
    assert shared_redis.exists(Keys(prefix, 1).input(execution_id)) == 0
    # The worker holds a few copies of the payload at a time (read, request frame, output,
    # checkpoint), not one per step or per retry.
    assert peak_rss_bytes(daemon.pid) < 12 * 64 * MB


def peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    kilobytes = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
    return int(kilobytes) * 1024


def test_failing_step_fails_the_execution_and_later_steps_do_not_run(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    steps = ["first", "second", "third"]
    serve()
    result = run_one(
        counting_integration("fails", steps), counting_input(prefix, fail=["second"]), prefix
    )

    assert result.status == "failed"
    assert result.failed_step == "second"
    assert result.error is not None
    assert result.error.type == "exception"
    assert result.error.message.startswith("ValueError: boom in second")
    assert result.output is None
    assert [report.name for report in result.steps] == ["first", "second"]
    assert result.steps[0].outcome.ok and not result.steps[1].outcome.ok
    assert result.steps[1].outcome.error == result.error
    assert run_counts(shared_redis, prefix, steps) == {"first": 1, "second": 1, "third": 0}


RETRY_FILES = {
    "stamp.py": (
        "import time\n"
        "def run(input, ctx):\n"
        "    return {'stamp_attempt': ctx.attempt, 'stamped_at': time.time()}\n"
    ),
    "flaky.py": (
        "import time\n"
        "def run(input, ctx):\n"
        "    if ctx.attempt == 1:\n"
        "        raise RuntimeError('transient')\n"
        "    return {**input, 'flaky_attempt': ctx.attempt, 'retried_at': time.time()}\n"
    ),
}


def test_failed_step_is_retried_after_backoff_and_succeeds(
    serve: ServeFactory, prefix: str, tmp_path: Path
) -> None:
    retry_base_s = 1.0  # first retry after 0.5..1.0 s (full jitter in the upper half)
    spec = {
        "name": "flaky",
        "retries": 2,
        "steps": [{"name": "stamp", "code": "stamp.py"}, {"name": "flaky", "code": "flaky.py"}],
    }
    integration = Integration.load(write_integration(tmp_path / "flaky", spec, RETRY_FILES))
    serve(retry_base_s=retry_base_s)
    result = run_one(integration, None, prefix)

    assert result.status == "succeeded", (result.error, result.failed_step)
    assert result.attempts == 2
    assert result.error is None
    # The retry resumed at the failed step with the first step's output: `stamp` ran once.
    assert result.output["stamp_attempt"] == 1
    assert result.output["flaky_attempt"] == 2
    waited_s = result.output["retried_at"] - result.output["stamped_at"]
    assert waited_s >= retry_base_s / 2 - 0.05
    assert waited_s < 10  # it came back from the delayed set, not from a reclaim much later
    assert [report.name for report in result.steps] == ["stamp", "flaky"]
    assert all(report.outcome.ok for report in result.steps)


def test_undecodable_entries_are_dead_lettered_and_the_worker_keeps_running(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 1)
    daemon = serve()
    integration = counting_integration("around", ["only"])
    before = run_async(submit_all(SHARED_REDIS_URL, prefix, integration, [counting_input(prefix)]))
    garbage = [
        {b"junk": b"no body field"},
        {b"e": b"\x93\xff\x00not msgpack"},
        {b"e": msgspec.msgpack.encode({"execution_id": 7})},
    ]
    garbage_ids = [shared_redis.xadd(keys.work(0), fields) for fields in garbage]
    after = run_async(submit_all(SHARED_REDIS_URL, prefix, integration, [counting_input(prefix)]))

    results = run_async(wait_all(SHARED_REDIS_URL, prefix, before + after))
    assert [result.status for result in results] == ["succeeded", "succeeded"]
    dead = wait_for(
        lambda: (found := shared_redis.xrange(keys.dead(0))) and len(found) == 3 and found,
        10,
        "three dead letters",
    )
    # Entries read in one batch are handled concurrently: their dead letters come in any order.
    originals = dict(zip(garbage_ids, garbage, strict=True))
    assert sorted(fields[b"entry_id"] for _, fields in dead) == sorted(garbage_ids)
    for _, fields in dead:
        assert fields[b"reason"].startswith(b"undecodable entry: ")
        assert fields[b"entry"] == originals[fields[b"entry_id"]].get(b"e", b"")
    assert shared_redis.xlen(keys.work(0)) == 0
    assert shared_redis.xpending(keys.work(0), GROUP)["pending"] == 0
    assert daemon.is_alive()


def test_entry_delivered_too_often_is_dead_lettered_and_its_submitter_told(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 1)
    integration = counting_integration("poison", ["never"])
    (execution_id,) = run_async(
        submit_all(SHARED_REDIS_URL, prefix, integration, [counting_input(prefix)])
    )
    # A consumer that keeps taking the entry and dying before it finishes: five deliveries.
    shared_redis.xgroup_create(keys.work(0), GROUP, id="0", mkstream=True)
    shared_redis.xreadgroup(GROUP, "crashing", {keys.work(0): ">"})
    for _ in range(4):
        shared_redis.xreadgroup(GROUP, "crashing", {keys.work(0): "0"})
    (entry_id, _), *_ = shared_redis.xrange(keys.work(0))

    daemon = serve(max_deliveries=3, claim_idle_s=1)
    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=15))

    assert result.status == "dead"
    assert result.error is not None
    assert re.fullmatch(r"delivered \d+ times \(limit 3\)", result.error.message)
    assert result.steps == []
    ((_, fields),) = shared_redis.xrange(keys.dead(0))
    assert fields[b"reason"].decode() == result.error.message
    assert fields[b"entry_id"] == entry_id
    assert run_counts(shared_redis, prefix, ["never"]) == {"never": 0}
    assert shared_redis.xlen(keys.work(0)) == 0
    # The input stays, for as long as the result, so that a replay can run it again.
    assert shared_redis.pttl(keys.input(execution_id)) > 0
    assert shared_redis.exists(keys.checkpoint(execution_id)) == 0
    assert daemon.is_alive()


def test_entry_with_a_foreign_execution_id_is_dead_lettered_not_crashed_on(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 2)
    daemon = serve(partitions=2, claim_idle_s=1)
    # Well-formed entries whose ids name no partition, or the other partition: their keys would
    # live under another hash tag, so they cannot be run or answered here.
    foreign = [
        Execution("not-an-id", "digest", time.time()),
        Execution(f"1-{uuid.uuid4().hex}", "digest", time.time()),
        Execution(f"7-{uuid.uuid4().hex}", "digest", time.time()),
    ]
    for execution in foreign:
        shared_redis.xadd(keys.work(0), {b"e": msgspec.msgpack.encode(execution)})

    dead = wait_for(
        lambda: (found := shared_redis.xrange(keys.dead(0))) and len(found) == 3 and found,
        10,
        "three dead letters",
    )
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert reasons == [
        f"execution id {execution.execution_id!r} is not one of partition 0"
        for execution in foreign
    ]
    assert shared_redis.xpending(keys.work(0), GROUP)["pending"] == 0
    assert daemon.is_alive()
    assert "Traceback" not in daemon.log()


def test_duplicate_entry_of_a_finished_execution_is_acked_not_dead_lettered(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    keys = Keys(prefix, 1)
    integration = counting_integration("twice", ["once"])
    (execution_id,) = run_async(
        submit_all(SHARED_REDIS_URL, prefix, integration, [counting_input(prefix)])
    )
    # At-least-once leaves duplicates behind, e.g. a give-back whose reply was lost and that was
    # sent again. One worker slot: the duplicate runs only after the original completed.
    ((_, fields),) = shared_redis.xrange(keys.work(0))
    shared_redis.xadd(keys.work(0), fields)
    daemon = serve(concurrency=1)

    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id]))
    assert result.status == "succeeded", (result.error, result.failed_step)
    wait_for(lambda: shared_redis.xlen(keys.work(0)) == 0, 10, "both entries to be acked")
    assert shared_redis.xpending(keys.work(0), GROUP)["pending"] == 0
    assert shared_redis.xrange(keys.dead(0)) == []
    assert run_counts(shared_redis, prefix, ["once"]) == {"once": 1}
    (again,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id]))
    assert again.raw == result.raw
    assert daemon.is_alive()
