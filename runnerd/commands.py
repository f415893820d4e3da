"""The Redis-side subcommands: serve, submit, demo. cli.py parses; these do one thing each."""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from runnerd import log
from runnerd.client import Client, Result
from runnerd.daemon import Worker
from runnerd.embedded import EmbeddedRedis
from runnerd.errors import SandboxUnavailable, UsageError
from runnerd.messages import Integration
from runnerd.outcomes import (
    EXIT_FAILED,
    EXIT_NO_RESULT,
    EXIT_OK,
    check_required_layers,
    outcome_json,
    read_json_input,
    write_stdout,
)
from runnerd.settings import Settings

DEMO = Path(__file__).resolve().parent / "demo" / "integration.json"


@contextlib.asynccontextmanager
async def redis_url_for(settings: Settings, embedded: bool) -> AsyncIterator[str]:
    if not embedded:
        yield settings.redis_url
        return
    async with EmbeddedRedis() as redis:
        yield redis.url


async def start_worker(settings: Settings, redis_url: str) -> Worker:
    worker = await Worker.start(msgspec.structs.replace(settings, redis_url=redis_url))
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
        worker = await start_worker(settings, url)
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
    integration = Integration.load(args.integration)
    data = read_json_input(args.input)
    async with Client.connect(
        settings.redis_url, settings.key_prefix, settings.partitions
    ) as client:
        execution_id = await client.submit(integration, data)
        if not args.wait:
            print(execution_id)
            return EXIT_OK
        return await _print_result(client, execution_id, args.timeout)


async def result(args: argparse.Namespace, settings: Settings) -> int:
    """`runnerd result ID [--wait]`: what `submit --wait` prints, for an execution submitted
    earlier (or by someone else)."""
    if args.timeout < 0:
        raise UsageError("--timeout must not be negative")
    async with Client.connect(
        settings.redis_url, settings.key_prefix, settings.partitions
    ) as client:
        try:
            client.keys.partition_of(args.execution_id)
        except ValueError as exc:
            raise UsageError(f"{exc} (RUNNERD_PARTITIONS={settings.partitions})") from None
        if args.wait:
            return await _print_result(client, args.execution_id, args.timeout)
        found = await client.result(args.execution_id)
    if found is None:
        print(
            f"runnerd: no result for {args.execution_id}: queued, running, unknown, or "
            f"expired (results are kept {settings.result_ttl_s:g} s); --wait to wait for it",
            file=sys.stderr,
        )
        return EXIT_NO_RESULT
    return _write_result(found)


async def _print_result(client: Client, execution_id: str, timeout_s: float) -> int:
    try:
        found = await client.wait(execution_id, timeout=timeout_s)
    except TimeoutError:
        print(
            f"runnerd: no result for {execution_id} after {timeout_s:g} s: it is still queued "
            "or running (is a worker serving this Redis, key prefix and partitions?); "
            f"`runnerd result {execution_id} --wait` waits again",
            file=sys.stderr,
        )
        return EXIT_NO_RESULT
    return _write_result(found)


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
