"""The operator's CLI as a person or a script runs it (issue 13): `submit --input @file.jsonl`,
`status`, `dead-letters list|show|replay|purge`, `cancel`, against real `runnerd serve`
workers on the shared Redis; and the user errors (item 5), each one line, no traceback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from runnerd import __version__
from runnerd.keys import Keys
from tests.runnerd.clusters import Cluster, spread_prefix
from tests.runnerd.clusters import cluster as cluster  # the 3-master cluster fixture
from tests.runnerd.conftest import (
    COUNTING_STEP,
    SHARED_REDIS_URL,
    ServeFactory,
    counting_input,
    run_counts,
    wait_for,
    write_integration,
)
from tests.runnerd.test_cluster import PARTITIONS
from tests.runnerd.test_commands import GOOD, STEPS, one_line, runnerd

Run = subprocess.CompletedProcess[str]


@pytest.fixture
def cli(prefix: str) -> Any:
    """cli(*args) runs `runnerd ARGS` on the shared Redis under this test's key prefix."""

    def run(*args: str, timeout_s: float = 60, **env: str) -> Run:
        settings = {"REDIS_URL": SHARED_REDIS_URL, "RUNNERD_KEY_PREFIX": prefix, **env}
        return runnerd(*args, timeout_s=timeout_s, **settings)

    return run


@pytest.fixture
def integration(tmp_path: Path) -> Path:
    return write_integration(tmp_path / "integration", GOOD, STEPS)


def lines_file(path: Path, *lines: str) -> str:
    path.write_text("\n".join(lines) + "\n")
    return "@" + str(path)


def keys(prefix: str) -> Keys:
    return Keys(prefix, 1)


# --- submit --input @file.jsonl --------------------------------------------------------------


def test_submit_json_lines_then_the_result_of_each(
    serve: ServeFactory, cli: Any, integration: Path, tmp_path: Path
) -> None:
    """One execution per line (the blank one skipped), ids in input order; each result then
    looked up as `result ID --wait`."""
    inputs = lines_file(tmp_path / "inputs.jsonl", '{"n": 1}', "", '{"n": 2}', "  ", '{"n": 3}')
    submitted = cli("submit", str(integration), "--input", inputs)

    assert submitted.returncode == 0, submitted.stderr
    execution_ids = submitted.stdout.split()
    assert len(execution_ids) == 3
    serve()
    outputs = []
    for execution_id in execution_ids:
        done = cli("result", execution_id, "--wait", "--timeout", "30")
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout)["output"])
    assert outputs == [{"n": 4}, {"n": 6}, {"n": 8}]  # (n + 1) * 2


def test_submit_json_lines_wait_prints_one_result_each_and_exits_1_if_one_failed(
    serve: ServeFactory, cli: Any, integration: Path, tmp_path: Path
) -> None:
    serve()
    inputs = lines_file(tmp_path / "inputs.jsonl", '{"n": 1}', '{"n": 60}', '{"n": 2}')
    done = cli("submit", str(integration), "--input", inputs, "--wait", "--timeout", "30")

    assert done.returncode == 1, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["status"] for r in results] == ["succeeded", "failed", "succeeded"]
    assert [r["output"] for r in results] == [{"n": 4}, None, {"n": 6}]
    assert results[1]["failed_step"] == "check"
    assert done.stderr == ""


def test_submit_json_lines_with_a_bad_line_submits_nothing(
    cli: Any, integration: Path, tmp_path: Path, shared_redis: redis.Redis, prefix: str
) -> None:
    path = tmp_path / "inputs.jsonl"
    inputs = lines_file(path, '{"n": 1}', "", '{"n": 2,}', '{"n": 3}')
    done = cli("submit", str(integration), "--input", inputs)

    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"runnerd: --input {path} line 3 is not valid JSON: JSON is malformed: trailing comma "
        "in object (column 9); nothing was submitted"
    )
    assert done.stdout == ""
    assert shared_redis.xlen(keys(prefix).work(0)) == 0


def test_submit_json_and_json_file_inputs_still_work(
    serve: ServeFactory, cli: Any, integration: Path, tmp_path: Path
) -> None:
    serve()
    (tmp_path / "event.json").write_text('{"n": 2}')
    from_file = cli("submit", str(integration), "--input", f"@{tmp_path / 'event.json'}", "--wait")
    inline = cli("submit", str(integration), "--input", '{"n": 3}', "--wait", "--json")

    assert json.loads(from_file.stdout)["output"] == {"n": 6}
    assert json.loads(inline.stdout)["output"] == {"n": 8}
    queued = cli("submit", str(integration), "--input", '{"n": 3}', "--json")
    assert set(json.loads(queued.stdout)) == {"execution_id"}


# --- status ----------------------------------------------------------------------------------


def test_status_shows_the_backlog_then_the_worker_that_drains_it(
    serve: ServeFactory, cli: Any, integration: Path, tmp_path: Path
) -> None:
    inputs = lines_file(tmp_path / "inputs.jsonl", '{"n": 1}', '{"n": 2}', '{"n": 3}')
    execution_ids = cli("submit", str(integration), "--input", inputs).stdout.split()

    queued = cli("status", "--json")
    assert queued.returncode == 0, queued.stderr
    state = json.loads(queued.stdout)
    (partition,) = state["partitions"]
    assert partition["backlog"] == 3 and partition["pending"] == 0
    assert partition["oldest_age_s"] is not None and 0 <= partition["oldest_age_s"] < 60
    assert partition["delayed"] == 0 and partition["dead"] == 0
    assert state["workers"] == []
    assert state["totals"]["backlog"] == 3
    text = cli("status").stdout
    assert "no live worker" in text
    assert "total: 3 waiting, 0 pending" in text

    daemon = serve(concurrency=3)
    for execution_id in execution_ids:
        assert cli("result", execution_id, "--wait", "--timeout", "30").returncode == 0

    def drained() -> dict[str, Any] | None:
        state = json.loads(cli("status", "--json").stdout)
        return state if state["workers"] and state["totals"]["backlog"] == 0 else None

    state = wait_for(drained, 20, "the worker in status, the backlog drained")
    (worker,) = state["workers"]
    assert worker["worker_id"] == daemon.worker_id
    assert worker["concurrency"] == 3 and worker["version"] == __version__
    assert worker["in_flight"] == 0 and worker["draining"] is False
    assert state["partitions"][0]["oldest_age_s"] is None
    assert state["totals"]["concurrency"] == 3
    text = cli("status").stdout
    assert "WORKER" in text and daemon.worker_id in text
    assert "1 worker(s), 0 of 3 slots in flight" in text


# --- dead letters ----------------------------------------------------------------------------


def dead_letter_an_execution(
    cli: Any, serve: ServeFactory, integration: Path, shared_redis: redis.Redis, prefix: str
) -> str:
    """Submit with no worker, delete the integration it names, start a worker: the entry is
    dead-lettered ("integration ... not found") and the submitter gets `dead`."""
    execution_id = cli("submit", str(integration), "--input", '{"n": 1}').stdout.strip()
    for key in shared_redis.scan_iter(match=f"{{{prefix}-0}}:integration:*"):
        shared_redis.delete(key)
    serve()
    done = cli("result", execution_id, "--wait", "--timeout", "30")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["status"] == "dead"
    return str(execution_id)


def test_dead_letters_list_show_then_replay_after_the_cause_is_fixed(
    serve: ServeFactory,
    cli: Any,
    integration: Path,
    shared_redis: redis.Redis,
    prefix: str,
) -> None:
    execution_id = dead_letter_an_execution(cli, serve, integration, shared_redis, prefix)

    listed = json.loads(cli("dead-letters", "list", "--json").stdout)
    assert listed["total"] == 1
    (letter,) = listed["dead_letters"]
    assert letter["id"].startswith("0:")
    assert letter["execution"]["execution_id"] == execution_id
    assert "not found" in letter["reason"]
    text = cli("dead-letters", "list").stdout
    assert letter["id"] in text and execution_id in text
    assert json.loads(cli("status", "--json").stdout)["totals"]["dead"] == 1

    shown = cli("dead-letters", "show", letter["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["dead_letter"]["reason"] == letter["reason"]
    assert report["result"]["status"] == "dead"
    assert report["integration_stored"] is False
    text = cli("dead-letters", "show", letter["id"]).stdout
    assert f"execution: {execution_id}, attempt 1" in text
    assert "result: dead" in text

    # Not yet fixed: the integration is still gone, so a replay would only die again.
    refused = cli("dead-letters", "replay", letter["id"])
    assert refused.returncode == 1
    assert refused.stdout.strip().startswith(f"not replayed {letter['id']}: its integration ")
    assert json.loads(cli("dead-letters", "list", "--json").stdout)["total"] == 1
    # The worker kept the input with the dead letter, for as long as a result is kept; once
    # it has expired, nothing is left to run.
    input_key = keys(prefix).input(execution_id)
    assert shared_redis.pttl(input_key) > 0
    kept = shared_redis.get(input_key)
    shared_redis.delete(input_key)
    expired = cli("dead-letters", "replay", letter["id"])
    assert expired.returncode == 1
    assert "the input payload of execution" in expired.stdout and "is gone" in expired.stdout
    shared_redis.set(input_key, kept, px=60_000)

    # The cause is fixed: the integration is stored again (any submit of it does that).
    assert cli("submit", str(integration), "--input", '{"n": 2}', "--wait").returncode == 0
    replayed = cli("dead-letters", "replay", letter["id"])
    assert replayed.returncode == 0, replayed.stderr
    line = one_line(replayed.stdout)
    assert line.startswith(f"replayed {letter['id']} as execution {execution_id} (new entry ")
    done = cli("result", execution_id, "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded" and result["output"] == {"n": 4}
    assert result["attempts"] == 1
    assert json.loads(cli("dead-letters", "list", "--json").stdout)["total"] == 0
    again = cli("dead-letters", "replay", letter["id"])
    assert again.returncode == 3
    assert again.stdout.strip() == f"no dead letter {letter['id']} (replayed or purged already?)"


def test_undecodable_dead_letters_are_shown_refused_and_purged(
    serve: ServeFactory, cli: Any, shared_redis: redis.Redis, prefix: str
) -> None:
    serve()
    work = keys(prefix).work(0)
    shared_redis.xadd(work, {b"e": b"\xc1 not msgpack"})
    shared_redis.xadd(work, {b"x": b"no body"})
    wait_for(lambda: shared_redis.xlen(keys(prefix).dead(0)) == 2, 20, "two dead letters")

    listed = json.loads(cli("dead-letters", "list", "--json").stdout)
    assert listed["total"] == 2
    newest, oldest = listed["dead_letters"]
    assert newest["id"] > oldest["id"]
    assert all(letter["execution"] is None for letter in listed["dead_letters"])
    assert "-" in cli("dead-letters", "list", "--limit", "1").stdout.splitlines()[1]
    assert (
        "(1 newest of 2; --limit N shows more)"
        in cli("dead-letters", "list", "--limit", "1").stdout
    )
    text = cli("dead-letters", "show", oldest["id"]).stdout
    assert "undecodable entry" in text and "it cannot be replayed" in text

    refused = cli("dead-letters", "replay", oldest["id"], "--json")
    assert refused.returncode == 1
    (replay,) = json.loads(refused.stdout)["replays"]
    assert replay["outcome"] == "undecodable"

    asked = cli("dead-letters", "purge")
    assert asked.returncode == 2
    assert one_line(asked.stderr) == (
        "runnerd: dead-letters purge: would delete 2 dead letter(s) of every partition; "
        "--yes deletes them"
    )
    assert shared_redis.xlen(keys(prefix).dead(0)) == 2
    purged = cli("dead-letters", "purge", "--yes")
    assert purged.returncode == 0
    assert purged.stdout.strip() == "deleted 2 dead letter(s)"
    assert cli("dead-letters", "list").stdout.strip() == "no dead letters"
    assert json.loads(cli("dead-letters", "purge", "--yes", "--json").stdout) == {"deleted": 0}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["show", "1712345678901-0x"],
            "runnerd: '1712345678901-0x' is not a dead-letter id: `runnerd dead-letters list` "
            "shows them, as <partition>:<stream id> (e.g. 0:1712345678901-0)",
        ),
        (
            ["replay", "0:1-0", "4:1-0"],
            "runnerd: dead letter '4:1-0': partition 4 does not exist (RUNNERD_PARTITIONS=1)",
        ),
        (
            [],
            "runnerd: dead-letters: a subcommand is needed: list, show, replay, purge "
            "(runnerd dead-letters --help says more)",
        ),
    ],
)
def test_dead_letter_usage_errors_exit_2(cli: Any, args: list[str], expected: str) -> None:
    done = cli("dead-letters", *args)

    assert done.returncode == 2
    assert one_line(done.stderr) == expected


def test_show_of_a_missing_dead_letter_exits_3(cli: Any) -> None:
    done = cli("dead-letters", "show", "0:1-0")

    assert done.returncode == 3
    assert one_line(done.stderr) == "runnerd: no dead letter 0:1-0"


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_a_queued_execution_it_never_runs(
    serve: ServeFactory, cli: Any, tmp_path: Path, shared_redis: redis.Redis, prefix: str
) -> None:
    def counting(name: str) -> Path:
        spec = {
            "name": name,
            "steps": [{"name": name, "code": str(COUNTING_STEP), "network": True}],
        }
        return write_integration(tmp_path / name, spec, {})

    data = json.dumps(counting_input(prefix))
    execution_id = cli("submit", str(counting("never")), "--input", data).stdout.strip()

    cancelled = cli("cancel", execution_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"cancelled {execution_id}")
    done = cli("result", execution_id)
    assert done.returncode == 1
    assert json.loads(done.stdout)["status"] == "cancelled"

    # One worker, one slot: the entry queued first is taken first, so once the one queued
    # after it has run, the cancelled one has been taken too, and not run.
    serve(concurrency=1)
    after = cli("submit", str(counting("after")), "--input", data, "--wait", "--timeout", "30")
    assert after.returncode == 0, after.stderr
    assert run_counts(shared_redis, prefix, ["never", "after"]) == {"never": 0, "after": 1}
    wait_for(
        lambda: json.loads(cli("status", "--json").stdout)["totals"]["backlog"] == 0,
        10,
        "the cancelled entry acked",
    )

    again = cli("cancel", execution_id, "--json")
    assert again.returncode == 1
    assert json.loads(again.stdout) == {
        "execution_id": execution_id,
        "outcome": "finished",
        "status": "cancelled",
    }
    assert cli("cancel", execution_id).stdout.strip() == "already finished: cancelled"


def test_cancel_of_an_unknown_execution_exits_3(cli: Any) -> None:
    unknown = "0-" + "0" * 32
    done = cli("cancel", unknown)

    assert done.returncode == 3
    assert done.stdout.strip() == (
        f"unknown execution {unknown} (never submitted here, or its result expired)"
    )
    foreign = cli("cancel", "9-abc")
    assert foreign.returncode == 2
    assert one_line(foreign.stderr) == (
        "runnerd: not an execution id of this deployment: '9-abc' (RUNNERD_PARTITIONS=1)"
    )


# --- item 5: user errors, one line each --------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["status"], ["result", "0-abc"], ["dead-letters", "list"], ["cancel", "0-abc"]]
)
def test_redis_url_without_a_scheme(cli: Any, args: list[str]) -> None:
    done = cli(*args, REDIS_URL="127.0.0.1:6379")

    assert done.returncode == 2
    assert one_line(done.stderr) == (
        "runnerd: REDIS_URL '127.0.0.1:6379' has no valid scheme (one of redis://, rediss://, "
        "unix://), e.g. redis://127.0.0.1:6379/0"
    )


def test_redis_url_without_a_scheme_for_submit(cli: Any, integration: Path) -> None:
    done = cli("submit", str(integration), REDIS_URL="localhost")

    assert done.returncode == 2
    assert "REDIS_URL 'localhost' has no valid scheme" in one_line(done.stderr)


@pytest.mark.parametrize("args", [["status"], ["result", "0-abc"], ["submit", "INTEGRATION"]])
def test_redis_url_with_a_database_that_does_not_exist(
    cli: Any, args: list[str], integration: Path
) -> None:
    args = [str(integration) if arg == "INTEGRATION" else arg for arg in args]
    done = cli(*args, REDIS_URL="redis://127.0.0.1:6379/99")

    assert done.returncode == 2
    assert one_line(done.stderr) == (
        "runnerd: REDIS_URL 'redis://127.0.0.1:6379/99' names a database this Redis does not "
        "have (DB index is out of range); use /0, or one below the server's `databases` setting"
    )


def test_submit_wait_with_no_worker_says_nothing_consumed_the_stream(
    cli: Any, integration: Path, shared_redis: redis.Redis, prefix: str
) -> None:
    done = cli("submit", str(integration), "--input", '{"n": 1}', "--wait", "--timeout", "1")

    assert done.returncode == 3
    assert done.stdout == ""
    line = one_line(done.stderr)
    entries: Any = shared_redis.xrange(keys(prefix).work(0))
    ((_, fields),) = entries
    execution_id = msgspec.msgpack.decode(fields[b"e"])["execution_id"]
    assert line == (
        f"runnerd: no result for {execution_id} after 1 s: nothing consumed the work stream "
        f"(no worker serves key prefix {prefix!r} on this REDIS_URL), so it is still queued; "
        f"start `runnerd serve`, then `runnerd result {execution_id} --wait` waits for it"
    )


@pytest.mark.parametrize("command", ["submit", "result"])
def test_a_negative_timeout_is_a_usage_error(cli: Any, command: str, integration: Path) -> None:
    target = str(integration) if command == "submit" else "0-abc"
    done = cli(command, target, "--wait", "--timeout", "-1")

    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"runnerd: {command}: argument --timeout: must not be negative: '-1'"
    )


SLOW_CALLBACK = re.compile(r"^Executing <.*> took [0-9.]+ seconds$")


def test_serve_on_a_busy_http_port_is_one_line_and_no_asyncio_warnings(cli: Any) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        # Development mode shows what a normal run hides: unclosed sockets and transports,
        # coroutines never awaited, tasks destroyed while pending.
        done = cli(
            "serve",
            timeout_s=60,
            RUNNERD_HTTP_PORT=str(port),
            RUNNERD_HTTP_HOST="127.0.0.1",
            RUNNERD_POOL_SIZE="1",
            PYTHONDEVMODE="1",
        )

    assert done.returncode == 1
    # Development mode also reports every callback slower than 0.1 s on stderr; on a loaded
    # host those notes are about the host, not about what this test checks.
    stderr = "\n".join(line for line in done.stderr.splitlines() if not SLOW_CALLBACK.match(line))
    line = one_line(stderr)
    assert line.startswith(f"runnerd: cannot serve HTTP on 127.0.0.1:{port} (RUNNERD_HTTP_PORT): ")
    assert "address already in use" in line
    # asyncio logs a destroyed task through logging, which serve sends to stdout as JSON.
    for warning in ("Task was destroyed", "never awaited", "Unclosed", "unclosed", "Warning"):
        assert warning not in done.stdout


def test_no_arguments_lists_the_subcommands_with_one_prefix() -> None:
    done = runnerd()

    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.count("runnerd:") == 1
    for command in ("submit", "result", "status", "dead-letters", "cancel", "serve"):
        assert f" {command}," in line or f" {command} " in line


def test_version_and_every_operator_command_has_help() -> None:
    assert runnerd("--version").stdout.strip() == f"runnerd {__version__}"
    for command in (
        ["status"],
        ["cancel"],
        *(["dead-letters", c] for c in ("list", "show", "replay", "purge")),
    ):
        done = runnerd(*command, "--help")
        assert done.returncode == 0, done.stderr
        assert "--json" in done.stdout and "[REDIS_URL, default" in " ".join(done.stdout.split())


def test_status_without_redis_is_one_line(cli: Any) -> None:
    done = cli("status", REDIS_URL="redis://127.0.0.1:1/0")

    assert done.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in one_line(done.stderr)


# --- on Redis Cluster ------------------------------------------------------------------------


def test_the_operator_commands_on_a_three_master_cluster(
    cluster: Cluster, serve: ServeFactory, integration: Path, tmp_path: Path
) -> None:
    """Partitions on every master: status reads each partition's keys with its own commands,
    dead letters are found and purged on all of them, and a cancel lands on its slot."""
    prefix = spread_prefix(cluster, PARTITIONS)
    env = {"REDIS_URL": cluster.url, "RUNNERD_KEY_PREFIX": prefix}
    env["RUNNERD_PARTITIONS"] = str(PARTITIONS)
    inputs = lines_file(tmp_path / "inputs.jsonl", *(json.dumps({"n": n}) for n in range(12)))
    execution_ids = runnerd("submit", str(integration), "--input", inputs, **env).stdout.split()
    assert len({execution_id.split("-")[0] for execution_id in execution_ids}) > 1

    state = json.loads(runnerd("status", "--json", **env).stdout)
    assert state["totals"]["backlog"] == 12
    assert sum(p["backlog"] for p in state["partitions"]) == 12
    cancelled = runnerd("cancel", execution_ids[0], **env)
    assert cancelled.returncode == 0, cancelled.stderr

    client = redis.RedisCluster.from_url(cluster.url)
    try:
        cluster_keys = Keys(prefix, PARTITIONS)
        for partition in range(PARTITIONS):
            client.xadd(cluster_keys.work(partition), {b"e": b"\xc1"})
        serve(redis_url=cluster.url, key_prefix=prefix, partitions=PARTITIONS)
        done = runnerd(
            "submit", str(integration), "--input", inputs, "--wait", "--timeout", "60", **env
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(runnerd("result", execution_ids[0], **env).stdout)["status"] == (
            "cancelled"
        )
        listed = json.loads(runnerd("dead-letters", "list", "--json", **env).stdout)
        assert listed["total"] == PARTITIONS
        assert {letter["partition"] for letter in listed["dead_letters"]} == set(range(PARTITIONS))
        shown = runnerd("dead-letters", "show", listed["dead_letters"][0]["id"], **env)
        assert shown.returncode == 0, shown.stderr
        purged = runnerd("dead-letters", "purge", "--yes", **env)
        assert purged.stdout.strip() == f"deleted {PARTITIONS} dead letter(s)"
        assert all(client.xlen(cluster_keys.dead(p)) == 0 for p in range(PARTITIONS))
    finally:
        client.close()
