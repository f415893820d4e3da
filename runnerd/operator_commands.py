"""The operator's subcommands: status, dead-letters list|show|replay|purge, cancel. Each reads
or changes Redis through its own module (queue_state.py, dead_letters.py, cancel.py) and prints
readable text, or one JSON document with --json.

Exit codes: 0 done; 1 what was asked did not happen (a replay refused, a cancel too late: the
execution had finished); 2 usage (also purge without --yes); 3 nothing there (no such dead
letter, an unknown execution).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from redis.exceptions import RedisError

from runnerd import cancel as cancel_module
from runnerd import dead_letters, queue_state
from runnerd.client import Result
from runnerd.commands import json_line, result_json
from runnerd.connection import open_redis
from runnerd.errors import StoreError, UsageError
from runnerd.keys import Keys
from runnerd.messages import result_decoder
from runnerd.outcomes import EXIT_FAILED, EXIT_NO_RESULT, EXIT_OK, EXIT_USAGE
from runnerd.settings import Settings
from runnerd.store import RedisClient

REASON_SHOWN = 100  # characters of a reason in `list`; `show` prints it whole


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[tuple[RedisClient, Keys]]:
    """Redis and the deployment's keys; a Redis failure on the way is one line, not a trace."""
    url = settings.redis_url
    redis = await open_redis(url)  # a REDIS_URL that cannot work is a ConfigError here
    try:
        yield redis, Keys(settings.key_prefix, settings.partitions)
    except (RedisError, OSError) as exc:
        raise StoreError(f"Redis at {url}: {exc}") from None
    finally:
        await redis.aclose()


# --- status ------------------------------------------------------------------------------------


async def status(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (redis, keys):
        state = await queue_state.read(redis, keys)
    if args.json:
        report = msgspec.to_builtins(state)
        report["totals"] = state.totals()
        print(json_line(report))
        return EXIT_OK
    rows = [["PARTITION", "BACKLOG", "PENDING", "OLDEST", "DELAYED", "DEAD"]]
    for p in state.partitions:
        rows.append(
            [str(p.partition), *map(str, (p.backlog, p.pending)), _age(p.oldest_age_s)]
            + [str(p.delayed), str(p.dead)]
        )
    lines = _table(rows)
    now = time.time()
    if state.workers:
        workers = [["WORKER", "HOST", "PID", "VERSION", "CONCURRENCY", "IN FLIGHT", "SEEN"]]
        for w in state.workers:
            seen = _age(max(0.0, now - w.seen_at)) + " ago" + (" (draining)" if w.draining else "")
            workers.append(
                [w.worker_id, w.host, str(w.pid), w.version, str(w.concurrency), str(w.in_flight)]
                + [seen]
            )
        lines += ["", *_table(workers)]
    else:
        lines += ["", "no live worker (none announced itself in the last 15 s)"]
    if state.loops:
        loops = [["LOOP OF EXECUTION", "STEP", "ITEMS DONE", "FAILED"]]
        for loop in state.loops:
            done = f"{loop.done}/{loop.total}"
            loops.append([loop.execution_id, loop.step, done, str(loop.failed)])
        lines += ["", *_table(loops)]
    t = state.totals()
    lines += [
        "",
        f"total: {t['backlog']} waiting, {t['pending']} pending, oldest {_age(t['oldest_age_s'])}, "
        f"{t['delayed']} delayed, {t['dead']} dead; {t['workers']} worker(s), "
        f"{t['in_flight']} of {t['concurrency']} slots in flight",
    ]
    print("\n".join(lines))
    return EXIT_OK


# --- dead letters ------------------------------------------------------------------------------


async def dead_letters_command(args: argparse.Namespace, settings: Settings) -> int:
    handler = {
        "list": _list,
        "show": _show,
        "replay": _replay,
        "purge": _purge,
    }[args.dead_letters_command]
    return await handler(args, settings)


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit <= 0:
        raise UsageError("dead-letters list: --limit must be positive")
    async with connected(settings) as (redis, keys):
        letters = await dead_letters.newest(redis, keys, args.limit)
        total = await dead_letters.count(redis, keys)
    if args.json:
        print(json_line({"total": total, "dead_letters": msgspec.to_builtins(letters)}))
        return EXIT_OK
    if not letters:
        print("no dead letters")
        return EXIT_OK
    rows = [["ID", "DEAD AT (UTC)", "EXECUTION", "REASON"]]
    for letter in letters:
        execution = letter.execution.execution_id if letter.execution else "-"
        reason = letter.reason.replace("\n", " ")
        if len(reason) > REASON_SHOWN:
            reason = reason[: REASON_SHOWN - 3] + "..."
        rows.append([letter.id, _when(letter.dead_at), execution, reason])
    lines = _table(rows)
    if total > len(letters):
        lines.append(f"({len(letters)} newest of {total}; --limit N shows more)")
    print("\n".join(lines))
    return EXIT_OK


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys(settings.key_prefix, settings.partitions)
    partition, stream_id = dead_letters.parse_id(args.id, keys)
    async with connected(settings) as (redis, keys):
        letter = await dead_letters.get(redis, keys, partition, stream_id)
        if letter is None:
            print(f"runnerd: no dead letter {args.id}", file=sys.stderr)
            return EXIT_NO_RESULT
        result, input_stored, integration_stored = None, False, False
        execution = letter.execution
        if execution is not None:
            raw: Any = await redis.get(keys.result(execution.execution_id))
            if raw is not None:
                with contextlib.suppress(msgspec.DecodeError):
                    result = result_json(Result.from_raw(result_decoder.decode(raw)))
            input_stored = bool(await redis.exists(keys.input(execution.execution_id)))
            digest_key = keys.integration(partition, execution.integration)
            integration_stored = bool(await redis.exists(digest_key))
    report = {
        "dead_letter": msgspec.to_builtins(letter),
        "input_stored": input_stored,
        "integration_stored": integration_stored,
        "result": result,
    }
    if args.json:
        print(json_line(report))
        return EXIT_OK
    lines = [
        f"dead letter {letter.id} (partition {letter.partition}), dead at {_when(letter.dead_at)}",
        "reason:",
        *["  " + line for line in letter.reason.splitlines() or [""]],
        f"entry: {letter.entry_id or '?'} on the work stream, {letter.entry_bytes} bytes",
    ]
    if execution is None:
        lines.append(f"execution: none ({letter.undecodable}); it cannot be replayed")
    else:
        lines += [
            f"execution: {execution.execution_id}, attempt {execution.attempt}, "
            f"submitted {_when(execution.submitted_at)}",
            f"integration: {execution.integration} "
            + ("(stored)" if integration_stored else "(gone: a submit of it stores it again)"),
            "input: " + ("stored" if input_stored else "gone (it cannot be replayed)"),
        ]
        if result is None:
            lines.append("result: none")
        else:
            error = result["error"]
            why = f" ({error['type']}: {error['message']})" if error else ""
            lines.append(f"result: {result['status']}{why}")
    print("\n".join(lines))
    return EXIT_OK


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys(settings.key_prefix, settings.partitions)
    wanted = [(text, *dead_letters.parse_id(text, keys)) for text in args.ids]  # all, first
    replays: list[dict[str, Any]] = []
    lines: list[str] = []
    async with connected(settings) as (redis, keys):
        for text, partition, stream_id in wanted:
            letter = await dead_letters.get(redis, keys, partition, stream_id)
            if letter is None:
                replays.append({"id": text, "outcome": "gone"})
                lines.append(f"no dead letter {text} (replayed or purged already?)")
                continue
            done = await dead_letters.replay(redis, keys, letter)
            replays.append(msgspec.to_builtins(done))
            lines.append(_replayed(done, letter))
    if args.json:
        print(json_line({"replays": replays}))
    else:
        print("\n".join(lines))
    outcomes = {replay["outcome"] for replay in replays}
    if outcomes - {"replayed", "gone"}:
        return EXIT_FAILED
    return EXIT_NO_RESULT if "gone" in outcomes else EXIT_OK


def _replayed(done: dead_letters.Replay, letter: dead_letters.DeadLetter) -> str:
    if done.outcome == "replayed":
        return (
            f"replayed {done.id} as execution {done.execution_id} (new entry {done.new_entry_id})"
        )
    if done.outcome == "gone":
        return f"no dead letter {done.id} (replayed or purged already?)"
    why = {
        "undecodable": f"nothing to run: {letter.undecodable}",
        "no_input": (
            f"the input payload of execution {done.execution_id} is gone (a dead letter's "
            "input is kept as long as results, RUNNERD_RESULT_TTL_S): submit it again instead"
        ),
        "no_integration": (
            f"its integration {letter.execution.integration if letter.execution else '?'} is "
            "no longer stored (a submit of it stores it again): it would only die again"
        ),
    }[done.outcome]
    return f"not replayed {done.id}: {why}"


async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as (redis, keys):
        if not args.yes:
            total = await dead_letters.count(redis, keys)
            print(
                f"runnerd: dead-letters purge: would delete {total} dead letter(s) of every "
                "partition; --yes deletes them",
                file=sys.stderr,
            )
            return EXIT_USAGE
        deleted = await dead_letters.purge(redis, keys)
    print(json_line({"deleted": deleted}) if args.json else f"deleted {deleted} dead letter(s)")
    return EXIT_OK


# --- cancel ------------------------------------------------------------------------------------


async def cancel(args: argparse.Namespace, settings: Settings) -> int:
    execution_id = args.execution_id
    async with connected(settings) as (redis, keys):
        try:
            outcome, found = await cancel_module.request_cancel(
                redis, keys, execution_id, settings.result_ttl_s
            )
        except ValueError as exc:
            raise UsageError(f"{exc} (RUNNERD_PARTITIONS={settings.partitions})") from None
    finished = found.status if found is not None and outcome == "finished" else None
    if args.json:
        print(json_line({"execution_id": execution_id, "outcome": outcome, "status": finished}))
    elif outcome == "cancelled":
        print(f"cancelled {execution_id}: it will not run, or its running step is killed")
    elif outcome == "finished":
        print(f"already finished: {finished or 'a result this version cannot read'}")
    else:
        print(f"unknown execution {execution_id} (never submitted here, or its result expired)")
    return {"cancelled": EXIT_OK, "finished": EXIT_FAILED}.get(outcome, EXIT_NO_RESULT)


# --- text --------------------------------------------------------------------------------------


def _table(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, the header first."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _when(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_s))
