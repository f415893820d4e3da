"""for_each loops through a real `runnerd serve`: item order, the three error policies, per-item
retries, the item limit, the output limit, a worker SIGKILLed mid-loop (only the items in
flight run again, each one logged), and distributed loops (items on the streams, one
continuation, under a race of last items and a worker's death)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from runnerd.errors import ConfigError
from runnerd.integration import Integration
from runnerd.keys import Keys
from runnerd.loop_store import LoopStore
from runnerd.messages import Execution, ItemResult
from tests.runnerd.conftest import (
    COUNTING_STEP,
    ROOT,
    SHARED_REDIS_URL,
    ServeFactory,
    counting_input,
    free_port,
    run_async,
    run_one,
    submit_all,
    wait_all,
    wait_for,
)

MAKE = "def run(input, ctx):\n    return {'files': [{'n': n} for n in range(input['count'])]}\n"
# Items finish out of order: the later an item, the sooner it is done.
DOUBLE = (
    "import time\n"
    "def run(input, ctx):\n"
    "    time.sleep(0.002 * (20 - input['n'] % 20))\n"
    "    if input['n'] in input.get('fail', []) or input.get('all_fail'):\n"
    "        raise ValueError(f\"no {input['n']}\")\n"
    "    return input['n'] * 2\n"
)
LABEL_JS = "export function run(v, ctx) { return { v, step: ctx.step }; }\n"


def loop_integration(**loop: Any) -> Integration:
    fail = loop.pop("fail", [])
    steps = loop.pop(
        "steps",
        [
            {
                "name": "double",
                "source": DOUBLE.replace("input.get('fail', [])", repr(fail)),
            },
            {"name": "label", "runtime": "node", "source": LABEL_JS},
        ],
    )
    return Integration.from_dict(
        {
            "name": "loop",
            "steps": [
                {"name": "make", "source": MAKE},
                {"name": "each", "for_each": {"items": "files", "steps": steps, **loop}},
            ],
        }
    )


def test_items_come_back_in_item_order_through_python_and_javascript(
    serve: ServeFactory, prefix: str
) -> None:
    serve()
    result = run_one(loop_integration(parallelism=4), {"count": 40}, prefix)

    assert result.status == "succeeded", result.error
    assert result.output == [{"v": n * 2, "step": f"each[{n}].label"} for n in range(40)]
    counts = result.steps[1].items
    assert counts is not None
    assert (counts.total, counts.succeeded, counts.failed, counts.skipped) == (40, 40, 0, 0)


def test_collect_keeps_failed_items_as_their_error_in_place(
    serve: ServeFactory, prefix: str
) -> None:
    serve()
    result = run_one(loop_integration(on_item_error="collect", fail=[3, 5]), {"count": 8}, prefix)

    assert result.status == "succeeded", result.error
    assert [item.get("v") for item in result.output] == [0, 2, 4, None, 8, None, 12, 14]
    assert result.output[3]["item"] == 3
    assert result.output[3]["step"] == "double"
    assert result.output[3]["error"]["type"] == "exception"
    assert "ValueError: no 3" in result.output[3]["error"]["message"]
    counts = result.steps[1].items
    assert counts is not None
    assert (counts.succeeded, counts.failed, counts.first_failed) == (6, 2, 3)


def test_skip_drops_failed_items(serve: ServeFactory, prefix: str) -> None:
    serve()
    result = run_one(loop_integration(on_item_error="skip", fail=[0, 7]), {"count": 8}, prefix)

    assert result.status == "succeeded", result.error
    assert [item["v"] for item in result.output] == [2, 4, 6, 8, 10, 12]
    assert result.steps[1].items is not None and result.steps[1].items.failed == 2


def test_fail_stops_launching_and_fails_with_the_item_and_its_index(
    serve: ServeFactory, prefix: str
) -> None:
    serve()
    result = run_one(loop_integration(parallelism=1, fail=[3]), {"count": 10}, prefix)

    assert result.status == "failed"
    assert result.failed_step == "each"
    assert result.error is not None and result.error.type == "exception"
    assert result.error.message.startswith("item 3, step double: ValueError: no 3")
    counts = result.steps[1].items
    assert counts is not None
    # One at a time: items 0-2 ran, 3 failed, 4-9 were never started.
    assert (counts.succeeded, counts.failed, counts.skipped, counts.first_failed) == (3, 1, 6, 3)


FLAKY = (
    "def run(input, ctx):\n"
    "    if input % 2 == 0 and ctx.attempt == 1:\n"
    "        raise RuntimeError('first run of an even item')\n"
    "    return [input, ctx.attempt]\n"
)


def test_an_item_is_retried_alone_as_its_retries_say(serve: ServeFactory, prefix: str) -> None:
    serve(retry_base_s="0.01")
    steps = [{"name": "flaky", "source": FLAKY}]
    spec = {
        "name": "flaky-loop",
        "steps": [{"name": "each", "for_each": {"steps": steps, "retries": 1}}],
    }
    result = run_one(Integration.from_dict(spec), list(range(6)), prefix)

    assert result.status == "succeeded", result.error
    # Even items ran twice (their second run succeeded), odd ones once.
    assert result.output == [[0, 2], [1, 1], [2, 2], [3, 1], [4, 2], [5, 1]]
    counts = result.steps[0].items
    assert counts is not None and (counts.succeeded, counts.retried) == (6, 3)

    without = {**spec, "name": "flaky-no-retries"}
    without["steps"] = [{"name": "each", "for_each": {"steps": steps}}]
    failed = run_one(Integration.from_dict(without), list(range(6)), prefix)
    assert failed.status == "failed"
    assert failed.error is not None and "first run of an even item" in failed.error.message


FATAL_ITEM = (
    "from runnerd.step import Fatal\n"
    "def run(input, ctx):\n"
    "    raise Fatal(f'item {input} cannot be done (run {ctx.attempt})')\n"
)


def test_an_item_failing_for_good_is_not_retried(serve: ServeFactory, prefix: str) -> None:
    serve(retry_base_s="0.01")
    steps = [{"name": "never", "source": FATAL_ITEM}]
    loop = {"steps": steps, "retries": 2, "on_item_error": "collect"}
    spec = {"name": "fatal-items", "steps": [{"name": "each", "for_each": loop}]}
    result = run_one(Integration.from_dict(spec), [0, 1], prefix)

    assert result.status == "succeeded", result.error
    assert [item["error"]["type"] for item in result.output] == ["fatal", "fatal"]
    assert "(run 1)" in result.output[0]["error"]["message"]
    counts = result.steps[0].items
    assert counts is not None and (counts.failed, counts.retried) == (2, 0)


def test_too_many_items_and_no_array_are_clear_fatal_errors(
    serve: ServeFactory, prefix: str
) -> None:
    serve(loop_items_max="100")
    limited = run_one(loop_integration(max_items=5), {"count": 6}, prefix)
    assert limited.status == "failed" and limited.attempts == 1
    assert limited.error is not None and limited.error.type == "fatal"
    assert "6 items, more than the 5 a loop may have" in limited.error.message

    # The worker's limit wins over a loop that asks for more.
    over = run_one(loop_integration(max_items=1000), {"count": 101}, prefix)
    assert over.error is not None and "more than the 100 a loop may have" in over.error.message

    spec = {
        "name": "no-array",
        "steps": [
            {
                "name": "each",
                "for_each": {
                    "items": "batch.files",
                    "steps": [{"name": "x", "source": "def run(i, c): return i"}],
                },
            }
        ],
    }
    integration = Integration.from_dict(spec)
    missing = run_one(integration, {"batch": {}}, prefix)
    assert missing.error is not None and missing.error.type == "fatal"
    assert missing.error.message == "for_each items `batch.files`: the input has no `batch.files`"
    not_array = run_one(integration, {"batch": {"files": "a.xml"}}, prefix)
    assert not_array.error is not None
    assert "must be an array; the input has a string there" in not_array.error.message

    empty = run_one(integration, {"batch": {"files": []}}, prefix)
    assert empty.status == "succeeded" and empty.output == []


def test_the_output_limit_applies_to_the_collected_list(serve: ServeFactory, prefix: str) -> None:
    serve()
    big = "def run(input, ctx):\n    return 'x' * 200_000\n"
    spec = {
        "name": "big-items",
        "limits": {"output_mb": 1},
        "steps": [{"name": "each", "for_each": {"steps": [{"name": "big", "source": big}]}}],
    }
    result = run_one(Integration.from_dict(spec), list(range(8)), prefix)

    assert result.status == "failed"
    assert result.error is not None and result.error.type == "output_limit"
    assert "list of 8 item results" in result.error.message


@pytest.mark.parametrize(
    ("loop", "message"),
    [
        (
            {"steps": [{"name": "inner", "for_each": {"steps": [{"name": "x", "source": "y"}]}}]},
            "`$.steps[0].for_each.steps[0]`: loops do not nest",
        ),
        ({"steps": []}, "`$.steps[0].for_each.steps` must list at least one step"),
        (
            {"items": "files..x", "steps": [{"name": "x", "source": "y"}]},
            "`$.steps[0].for_each.items` must be `$` (the whole input) or a path",
        ),
        (
            {"parallelism": 0, "steps": [{"name": "x", "source": "y"}]},
            "`$.steps[0].for_each.parallelism` must be between 1 and 1024",
        ),
        (
            {"on_item_error": "ignore", "steps": [{"name": "x", "source": "y"}]},
            "`$.steps[0].for_each.on_item_error`: 'ignore' is not one of fail, collect, skip",
        ),
        (
            {"paralelism": 2, "steps": [{"name": "x", "source": "y"}]},
            "unknown field `paralelism`; did you mean `parallelism`?",
        ),
    ],
)
def test_a_bad_loop_is_refused_naming_its_field(loop: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Integration.from_dict({"name": "bad", "steps": [{"name": "each", "for_each": loop}]})
    assert message in str(raised.value)


def test_a_loop_step_runs_no_code_of_its_own() -> None:
    step = {"name": "each", "code": "x.py", "for_each": {"steps": [{"name": "x", "source": "y"}]}}
    with pytest.raises(ConfigError) as raised:
        Integration.from_dict({"name": "bad", "steps": [step]})
    assert "is a for_each loop and runs no code of its own; move code into" in str(raised.value)


# --- crashes -------------------------------------------------------------------------------


def counting_loop(name: str, distribute: bool, parallelism: int) -> Integration:
    """Each item runs tests/runnerd/steps/counting.py, which counts its runs in Redis under the
    item's own step name (`each[7].count`); see counting_items for its input."""
    inner = [{"name": "count", "code": str(COUNTING_STEP), "network": True}]
    loop = {"steps": inner, "parallelism": parallelism, "distribute": distribute}
    return Integration.from_dict({"name": name, "steps": [{"name": "each", "for_each": loop}]})


def counting_items(prefix: str, total: int, sleep_s: float) -> list[dict[str, Any]]:
    """Items that each sleep `sleep_s` on their first run only."""
    return [
        counting_input(prefix, n=n, sleep_first_run={f"each[{n}].count": sleep_s})
        for n in range(total)
    ]


def item_runs(client: redis.Redis, prefix: str, total: int) -> list[int]:
    return [int(client.get(f"{{{prefix}}}:runs:each[{n}].count") or 0) for n in range(total)]


def rerun_items(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"loop each item (\d+) runs again", log)]


def loop_done(client: redis.Redis, prefix: str, execution_id: str) -> int:
    raw = client.hget(Keys(prefix, 1).loop(execution_id), "0:done")
    return int(raw or 0)


def test_a_worker_killed_mid_loop_loses_only_the_items_in_flight(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    total, parallelism = 24, 3
    first = serve(claim_idle_s="2", concurrency="4")
    integration = counting_loop("killed-inline", False, parallelism)
    (execution_id,) = run_async(
        submit_all(SHARED_REDIS_URL, prefix, integration, [counting_items(prefix, total, 0.4)])
    )
    wait_for(lambda: loop_done(shared_redis, prefix, execution_id) >= 6, 30, "6 items done")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    second = serve(claim_idle_s="2", concurrency="4")

    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=60))

    assert result.status == "succeeded", result.error
    assert [item["n"] for item in result.output] == list(range(total))
    runs = item_runs(shared_redis, prefix, total)
    assert all(count >= 1 for count in runs), runs
    repeated = sorted(n for n, count in enumerate(runs) if count > 1)
    # Only what was in flight ran again, and each repeat is explained in the new worker's log
    # (an item killed before its step got going is said to run again too: it was started).
    assert all(count <= 2 for count in runs), runs
    logged = rerun_items(second.log())
    assert 1 <= len(logged) <= parallelism, logged
    assert set(repeated) <= set(logged), (logged, repeated)
    counts = result.steps[0].items
    assert counts is not None and counts.rerun == len(logged)
    kept = re.search(r"loop each resumes: (\d+) of 24 items kept", second.log())
    assert kept is not None and int(kept[1]) >= 6


# --- distributed ---------------------------------------------------------------------------


def test_a_distributed_loop_runs_its_items_on_every_worker_and_continues_once(
    serve: ServeFactory, prefix: str
) -> None:
    workers = [serve(), serve()]
    integration = loop_integration(distribute=True, on_item_error="collect", fail=[11])

    result = run_one(integration, {"count": 60}, prefix, timeout_s=60)

    assert result.status == "succeeded", result.error
    assert [item.get("v") for item in result.output] == [
        None if n == 11 else n * 2 for n in range(60)
    ]
    ran = [len(re.findall(r"loop each item (succeeded|failed)", w.log())) for w in workers]
    assert sum(ran) == 60 and min(ran) > 0, ran
    continued = sum(w.log().count("the execution continues") for w in workers)
    assert continued == 1
    # The execution's worker let go of it while its items ran.
    assert any("execution handed to 60 loop items" in w.log() for w in workers)
    report = result.steps[1]
    assert report.items is not None
    assert (report.items.total, report.items.failed, report.items.rerun) == (60, 1, 0)
    assert 0 < report.outcome.duration_s < 60  # from the fan-out to the continuation


def test_a_distributed_loop_under_fail_ends_at_its_first_failure(
    serve: ServeFactory, prefix: str
) -> None:
    serve()
    result = run_one(
        loop_integration(distribute=True, fail=[4]), {"count": 12}, prefix, timeout_s=60
    )
    assert result.status == "failed"
    assert result.error is not None and result.error.message.startswith("item 4, step double:")


def test_the_last_items_racing_enqueue_one_continuation(prefix: str) -> None:
    """Many loops of two items whose ends are counted at the same moment from two
    connections, each end sent twice: every loop continues exactly once."""

    async def race() -> list[int]:
        keys = Keys(prefix, 1)
        connections = [aioredis.from_url(SHARED_REDIS_URL) for _ in range(2)]
        stores = [LoopStore(c, keys, 60_000) for c in connections]
        continued = []
        try:
            for _ in range(100):
                execution_id = keys.new_execution_id(0)
                await stores[0].start_distributed(execution_id, 0, "each", 2, 1)
                continuation = Execution(execution_id, "digest", 0.0, resumes_loop=0)
                ends = [
                    stores[index % 2].distributed_item_done(
                        execution_id, 0, index // 2, ItemResult(True), 1, True, continuation
                    )
                    for index in range(4)  # items 0 and 1, each ended twice
                ]
                continued.append(sum(await asyncio.gather(*ends)))
        finally:
            for connection in connections:
                await connection.aclose()
        return continued

    continued = run_async(race())

    assert continued == [1] * 100
    entries = redis.Redis.from_url(SHARED_REDIS_URL).xlen(Keys(prefix, 1).work(0))
    assert entries == 100


def test_a_distributed_loop_survives_a_worker_killed_mid_items(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    total = 30
    doomed = serve(claim_idle_s="2", concurrency="3")
    survivor = serve(claim_idle_s="2", concurrency="3")
    integration = counting_loop("killed-distributed", True, 3)
    (execution_id,) = run_async(
        submit_all(SHARED_REDIS_URL, prefix, integration, [counting_items(prefix, total, 0.5)])
    )
    wait_for(lambda: loop_done(shared_redis, prefix, execution_id) >= 6, 30, "6 items done")
    time.sleep(0.25)  # into the next items' first run (0.5 s), so that they have counted it
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(10)

    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=90))

    assert result.status == "succeeded", result.error
    assert [item["n"] for item in result.output] == list(range(total))
    runs = item_runs(shared_redis, prefix, total)
    repeated = sorted(n for n, count in enumerate(runs) if count > 1)
    assert all(1 <= count <= 2 for count in runs), runs
    logged = rerun_items(survivor.log())
    assert 1 <= len(logged) <= 3, logged  # the killed worker's concurrency
    assert set(repeated) <= set(logged), (logged, repeated)
    counts = result.steps[0].items
    assert counts is not None and counts.rerun == len(logged)
    continued = doomed.log().count("the execution continues")
    continued += survivor.log().count("the execution continues")
    assert continued == 1


# --- progress ------------------------------------------------------------------------------


def test_result_and_status_show_a_running_loops_items(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis
) -> None:
    serve()
    integration = counting_loop("progress", False, 1)
    (execution_id,) = run_async(
        submit_all(SHARED_REDIS_URL, prefix, integration, [counting_items(prefix, 40, 0.3)])
    )
    wait_for(lambda: loop_done(shared_redis, prefix, execution_id) >= 2, 30, "2 items done")
    env = {"REDIS_URL": SHARED_REDIS_URL, "RUNNERD_KEY_PREFIX": prefix, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runnerd", *args],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    shown = cli("result", execution_id)
    assert shown.returncode == 3
    found = re.search(r"its loop `each` has (\d+) of 40 items done", shown.stderr)
    assert found and 2 <= int(found[1]) < 40, shown.stderr

    status = json.loads(cli("status", "--json").stdout)
    (loop,) = status["loops"]
    assert (loop["execution_id"], loop["step"], loop["total"]) == (execution_id, "each", 40)
    assert 2 <= loop["done"] < 40
    assert "LOOP OF EXECUTION" in cli("status").stdout

    (result,) = run_async(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=60))
    assert result.status == "succeeded"
    # Once it ended, nothing of its loop is left in Redis.
    keys = shared_redis.scan_iter(f"{{{prefix}-0}}:*")
    leftovers = [key for key in keys if b":items:" in key or b":loop" in key]
    assert leftovers == []


def test_loop_items_are_counted_in_the_metrics(serve: ServeFactory, prefix: str) -> None:
    port = free_port()
    serve(http_port=str(port), http_host="127.0.0.1")
    run_one(loop_integration(on_item_error="collect", fail=[1]), {"count": 5}, prefix)

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = dict(re.findall(r'^runnerd_loop_items_total\{result="(\w+)"\} (\S+)$', text, re.M))
    assert float(samples["succeeded"]) == 4
    assert float(samples["failed"]) == 1
    assert float(samples["rerun"]) == 0


def test_the_running_loops_index_drops_what_outlived_its_loop(prefix: str) -> None:
    """A late duplicate run may add a loop to the index after its execution ended: the index
    expires as loop state does, drops members older than that, and `status` drops members
    whose loop state is gone."""
    keys = Keys(prefix, 1)
    admin = redis.Redis.from_url(SHARED_REDIS_URL)
    index = keys.loops(0)
    old = f"{keys.new_execution_id(0)}:1"
    admin.zadd(index, {old: 1_000})  # started long before the result TTL

    async def go() -> tuple[list[Any], list[Any]]:
        connection = aioredis.Redis.from_url(SHARED_REDIS_URL)
        store = LoopStore(connection, keys, 60_000)
        live, forgotten = keys.new_execution_id(0), keys.new_execution_id(0)
        await store.start(live, 1, "each", 10)
        await store.start(forgotten, 1, "each", 10)
        await connection.unlink(keys.loop(forgotten))  # as an expired or forgotten loop's
        members = await connection.zrange(index, 0, -1)
        running = await store.running(0, 10)
        await connection.aclose()
        return members, [execution_id for execution_id, _ in running]

    try:
        members, running = run_async(go())
        assert old.encode() not in members
        assert len(members) == 2
        assert len(running) == 1
        assert admin.zcard(index) == 1
        assert 0 < admin.pttl(index) <= 60_000
    finally:
        for key in admin.scan_iter(match="{" + prefix + "*"):
            admin.delete(key)
