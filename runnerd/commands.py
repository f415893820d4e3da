"""The Redis-side subcommands: serve, submit, result, demo (the operator's status, dead
letters and cancel are in operator.py). cli.py parses; these do one thing each."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from runnerd import log, queue_state
from runnerd.client import Client, Result
from runnerd.daemon import Worker
from runnerd.embedded import EmbeddedRedis
from runnerd.errors import BundleMissing, SandboxUnavailable, UsageError
from runnerd.loop_store import LoopStore
from runnerd.messages import Integration
from runnerd.outcomes import (
    EXIT_FAILED,
    EXIT_NO_RESULT,
    EXIT_OK,
    check_required_layers,
    is_json_lines,
    outcome_json,
    read_json_input,
    read_json_lines,
    write_stdout,
)
from runnerd.secret_source import SecretSource
from runnerd.settings import Settings

DEMO = Path(__file__).resolve().parent / "demo" / "integration.json"


@contextlib.asynccontextmanager
async def redis_url_for(settings: Settings, embedded: bool) -> AsyncIterator[str]:
    if not embedded:
        yield settings.redis_url
        return
    async with EmbeddedRedis() as redis:
        yield redis.url


async def start_worker(
    settings: Settings, redis_url: str, secrets: SecretSource | None = None
) -> Worker:
    worker = await Worker.start(msgspec.structs.replace(settings, redis_url=redis_url), secrets)
    refusal = check_required_layers(settings, worker.spawner.capabilities)
    if refusal is not None:
        await worker.close()
        raise SandboxUnavailable(refusal)
    return worker


async def serve(args: argparse.Namespace, settings: Settings) -> int:
    log.configure(settings.log_level)
    async with redis_url_for(settings, args.embedded_redis) as url:
        if args.embedded_redis:
            hint = f"submit with: REDIS_URL={url} runnerd submit ..."
            print(f"runnerd: embedded Redis at {url} — {hint}", file=sys.stderr)
        worker = await start_worker(settings, url, getattr(args, "secrets", None))
        try:
            await worker.serve()
        finally:
            await worker.close()
    return EXIT_OK


def result_json(result: Result) -> dict[str, Any]:
    return {
        "execution_id": result.execution_id,
        "status": result.status,
        "output": result.output,
        "error": msgspec.structs.asdict(result.error) if result.error else None,
        "failed_step": result.failed_step,
        "attempts": result.attempts,
        "duration_s": result.duration_s,
        "steps": [
            {
                "name": report.name,
                "output_bytes": report.output_bytes,
                **outcome_json(report.outcome),
            }
            for report in result.steps
        ],
    }


async def submit(args: argparse.Namespace, settings: Settings) -> int:
    """`runnerd submit FILE [--input JSON|@FILE.json|@FILE.jsonl] [--wait]`: one execution,
    or one per line of a JSON Lines file; their ids, or with --wait their results, one line
    each in input order."""
    integration = Integration.load(args.integration)
    many = is_json_lines(args.input)
    inputs = read_json_lines(args.input) if many else [read_json_input(args.input)]
    async with connected_client(settings) as client:
        try:
            execution_ids = await submit_inputs(client, integration, inputs)
        except BundleMissing as exc:  # say which file to build
            raise BundleMissing(str(exc).replace("INTEGRATION.json", args.integration)) from None
        if args.wait:
            if many:
                return await _print_results(client, execution_ids, args.timeout, settings)
            return await _print_result(client, execution_ids[0], args.timeout, settings)
    for execution_id in execution_ids:
        print(json_line({"execution_id": execution_id}) if args.json else execution_id)
    return EXIT_OK


async def submit_inputs(client: Client, integration: Integration, inputs: list[Any]) -> list[str]:
    """One execution per input, pipelined; their ids in input order."""
    return await client.submit_many(integration, inputs)


async def result(args: argparse.Namespace, settings: Settings) -> int:
    """`runnerd result ID [--wait]`: what `submit --wait` prints, for an execution submitted
    earlier (or by someone else)."""
    async with connected_client(settings) as client:
        try:
            client.keys.partition_of(args.execution_id)
        except ValueError as exc:
            raise UsageError(f"{exc} (RUNNERD_PARTITIONS={settings.partitions})") from None
        if args.wait:
            return await _print_result(client, args.execution_id, args.timeout, settings)
        found = await client.result(args.execution_id)
        loop = None
        if found is None:
            loops = LoopStore(client.redis, client.keys, 0)
            loop = await loops.state(args.execution_id)
    if found is None and loop is not None:
        failed = f", {loop.failed} failed" if loop.failed else ""
        print(
            f"runnerd: no result for {args.execution_id} yet: its loop `{loop.step}` has "
            f"{loop.done} of {loop.total} items done{failed}; --wait to wait for it",
            file=sys.stderr,
        )
        return EXIT_NO_RESULT
    if found is None:
        print(
            f"runnerd: no result for {args.execution_id}: queued, running, unknown, or "
            f"expired (results are kept {settings.result_ttl_s:g} s); --wait to wait for it",
            file=sys.stderr,
        )
        return EXIT_NO_RESULT
    return _write_result(found)


@contextlib.asynccontextmanager
async def connected_client(settings: Settings) -> AsyncIterator[Client]:
    """A REDIS_URL that cannot work (no scheme, a database the server does not have) is one
    line naming it: connection.open_redis says so."""
    async with Client.connect(
        settings.redis_url, settings.key_prefix, settings.partitions
    ) as client:
        yield client


async def _print_result(
    client: Client, execution_id: str, timeout_s: float, settings: Settings
) -> int:
    try:
        found = await client.wait(execution_id, timeout=timeout_s)
    except TimeoutError:
        print(await _no_result(client, [execution_id], timeout_s, settings), file=sys.stderr)
        return EXIT_NO_RESULT
    return _write_result(found)


async def _print_results(
    client: Client, execution_ids: list[str], timeout_s: float, settings: Settings
) -> int:
    """One line per execution in input order: its result, or `{"execution_id": ID, "status":
    null}` when it has none within the timeout (one deadline for all). Exit 1 if any failed,
    else 3 if any has no result, else 0."""

    async def wait(execution_id: str) -> Result | None:
        try:
            return await client.wait(execution_id, timeout=timeout_s)
        except TimeoutError:
            return None

    found = await asyncio.gather(*(wait(execution_id) for execution_id in execution_ids))
    lines = [
        result_json(one) if one else {"execution_id": execution_id, "status": None}
        for execution_id, one in zip(execution_ids, found, strict=True)
    ]
    write_stdout("".join(json_line(line) + "\n" for line in lines))
    pairs = zip(execution_ids, found, strict=True)
    missing = [execution_id for execution_id, one in pairs if one is None]
    if missing:
        print(await _no_result(client, missing, timeout_s, settings), file=sys.stderr)
    if any(one is not None and not one.ok for one in found):
        return EXIT_FAILED
    return EXIT_NO_RESULT if missing else EXIT_OK


async def _no_result(
    client: Client, missing: list[str], timeout_s: float, settings: Settings
) -> str:
    """Why there is no result: nothing reads the stream (no worker), or it is still running."""
    which = missing[0] if len(missing) == 1 else f"{len(missing)} executions"
    partitions = sorted({client.keys.partition_of(execution_id) for execution_id in missing})
    serving = [await queue_state.anyone_serving(client.redis, client.keys, p) for p in partitions]
    again = (
        f"`runnerd result {missing[0]} --wait`"
        if len(missing) == 1
        else "`runnerd result ID --wait`"
    )
    if not any(serving):
        still = "it is" if len(missing) == 1 else "they are"
        return (
            f"runnerd: no result for {which} after {timeout_s:g} s: nothing consumed the work "
            f"stream (no worker serves key prefix {settings.key_prefix!r} on this REDIS_URL), "
            f"so {still} still queued; start `runnerd serve`, then {again} waits for it"
        )
    return (
        f"runnerd: no result for {which} after {timeout_s:g} s: still queued or running "
        "(is a worker serving this Redis, key prefix and partitions?); "
        f"{again} waits again"
    )


def json_line(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _write_result(found: Result) -> int:
    write_stdout(msgspec.json.encode(result_json(found)).decode() + "\n")
    return EXIT_OK if found.ok else EXIT_FAILED


async def demo(args: argparse.Namespace, settings: Settings) -> int:
    integration = Integration.load(DEMO)
    settings = msgspec.structs.replace(settings, http_port=0)  # a demo opens no port
    # Its private Redis keeps nothing on purpose: no warnings about that, only the demo's output.
    logging.getLogger("runnerd").setLevel(logging.ERROR)
    async with EmbeddedRedis() as redis:
        worker = await start_worker(settings, redis.url)
        serving = asyncio_task(worker.serve(install_signals=False))
        try:
            async with Client.connect(
                redis.url, settings.key_prefix, settings.partitions
            ) as client:
                first = await client.run(integration, {"orders": 5}, timeout=60)
                timings = []
                # Timing runs that fail as the first did would only time the failure.
                for _ in range(max(0, args.runs) if first.ok else 0):
                    started = time.perf_counter()
                    await client.run(integration, {"orders": 5}, timeout=60)
                    timings.append(time.perf_counter() - started)
        finally:
            worker.stopping.set()
            await serving
            await worker.close()
    _print_demo(integration, first, timings)
    if not first.ok:
        reason = first.error.message if first.error else first.status
        print(
            f"runnerd: demo: step {first.failed_step!r} failed, so no timed runs: {reason}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def asyncio_task(coroutine: Any) -> Any:
    import asyncio

    return asyncio.create_task(coroutine)


def _print_demo(integration: Integration, result: Result, timings: list[float]) -> None:
    print(
        f"integration {integration.name!r}: {len(integration.steps)} steps, each in a fresh sandbox"
    )
    for report in result.steps:
        outcome = report.outcome
        status = "ok" if outcome.ok else f"FAILED ({outcome.error.type if outcome.error else '?'})"
        print(f"  {report.name:<10} {status:<8} {outcome.duration_s * 1000:7.1f} ms in the step")
        if outcome.error is not None:  # the reason, under its step (a traceback stays indented)
            indent = " " * 13
            print(indent + outcome.error.message.rstrip().replace("\n", "\n" + indent))
    print(f"status: {result.status}")
    print(f"output: {msgspec.json.encode(result.output).decode()}")
    if timings:
        timings.sort()
        p50 = statistics.median(timings) * 1000
        worst = timings[-1] * 1000
        print(
            f"end to end over {len(timings)} more runs (submit -> result, through Redis): "
            f"p50 {p50:.1f} ms, max {worst:.1f} ms"
        )
