"""Hostile and malformed input on the work stream: entries without the body field, bodies that
are not msgpack or not an execution, 1 MB of garbage, unknown entry versions and integration
digests, and integrations stored under their key with broken steps (an unknown runtime, no steps,
code that does not compile, limits no file would pass). Each must end in the dead-letter stream
with a reason a person can read (or, for an execution whose step is broken, with a `failed` or
`dead` result), while good executions submitted around it succeed on the same worker."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runnerd.client import Client
from runnerd.keys import Keys
from runnerd.messages import ENTRY_VERSION, Integration, encoder
from tests.chaos.conftest import DurableRedis
from tests.runnerd.conftest import Daemon, ServeFactory, wait_for

GOOD = Integration.from_dict(
    {"name": "good", "steps": [{"name": "add", "source": "def run(i, ctx):\n    return i + 1\n"}]}
)
REASON_MAX = 2000  # a reason quotes what was wrong, never the whole (maybe 1 MB) entry
WAIT_S = 30.0


@dataclass(frozen=True)
class Bad:
    """One malformed entry and what it must become."""

    what: str
    fields: dict[bytes, bytes]
    integration: bytes | None = None  # stored under the digest the entry names
    digest: str = ""
    execution_id: str = ""  # set when the entry decodes to an execution of this partition
    results: frozenset[str] = frozenset({"dead"})  # the statuses it may end with


def execution_body(execution_id: str, digest: str, version: int = ENTRY_VERSION) -> bytes:
    return encoder.encode(
        {
            "execution_id": execution_id,
            "integration": digest,
            "submitted_at": time.time(),
            "attempt": 1,
            "version": version,
        }
    )


def new_id() -> str:
    return f"0-{uuid.uuid4().hex}"


# msgpack has no integers past 64 bits: an entry cannot carry one, so none is generated.
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
garbage = st.binary(min_size=0, max_size=64)
field_names = st.binary(min_size=1, max_size=8).filter(lambda name: name != b"e")
wrong_values = st.one_of(
    msgpack_ints, st.text(max_size=20), st.none(), st.lists(msgpack_ints, max_size=3)
)


@st.composite
def undecodable(draw: st.DrawFn) -> Bad:
    choice = draw(st.sampled_from(["missing", "garbage", "giant", "wrong_types", "foreign_id"]))
    if choice == "missing":
        return Bad("no body field", {draw(field_names): draw(garbage)})
    if choice == "garbage":
        return Bad("not msgpack or not an execution", {b"e": draw(garbage)})
    if choice == "giant":
        return Bad("1 MB of garbage", {b"e": b"\xc1" + os.urandom(1024 * 1024)})
    if choice == "wrong_types":
        body = {
            "execution_id": draw(wrong_values),
            "integration": draw(wrong_values),
            "submitted_at": draw(st.one_of(st.text(max_size=5), st.none())),
        }
        return Bad("fields of the wrong types", {b"e": encoder.encode(body)})
    foreign = draw(st.sampled_from(["7-abc", "x-1", "", "0", "-1-2"]))
    return Bad("an id of no partition", {b"e": execution_body(foreign, "0" * 64)})


@st.composite
def unknown(draw: st.DrawFn) -> Bad:
    execution_id = new_id()
    if draw(st.booleans()):
        digest = draw(st.text("0123456789abcdef", min_size=1, max_size=64))
        body = execution_body(execution_id, digest)
        return Bad("unknown digest", {b"e": body}, execution_id=execution_id)
    version = draw(msgpack_ints.filter(lambda v: v != ENTRY_VERSION))
    body = execution_body(execution_id, "0" * 64, version)
    return Bad("unknown entry version", {b"e": body}, execution_id=execution_id)


def step(**fields: Any) -> dict[str, Any]:
    return {"name": "s", "runtime": "python", "filename": "s.py", "source": "", **fields}


BROKEN_INTEGRATIONS: dict[str, tuple[Any, frozenset[str]]] = {
    "unknown runtime": ({"name": "b", "steps": [step(runtime="cobol")]}, frozenset({"dead"})),
    "no steps": ({"name": "b", "steps": []}, frozenset({"dead"})),
    "steps not a list": ({"name": "b", "steps": "s"}, frozenset({"dead"})),
    "unknown step field": ({"name": "b", "steps": [step(shell=True)]}, frozenset({"dead"})),
    "python that does not compile": (
        {"name": "b", "steps": [step(source="def run(:\n")]},
        frozenset({"failed"}),
    ),
    "no run function": ({"name": "b", "steps": [step(source="x = 1\n")]}, frozenset({"failed"})),
    "javascript that does not parse": (
        {"name": "b", "steps": [step(runtime="node", filename="s.mjs", source="export {{{")]},
        frozenset({"failed"}),
    ),
    "exec without argv": (
        {"name": "b", "steps": [step(runtime="exec", filename="", argv=[])]},
        frozenset({"failed", "dead"}),
    ),
    "negative limits": (
        {
            "name": "b",
            "steps": [
                step(
                    source="def run(i, c):\n    return i\n",
                    limits={"memory_mb": -1, "pids": -5, "wall_s": -1.0},
                )
            ],
        },
        frozenset({"failed", "dead"}),
    ),
}


@st.composite
def broken_integration(draw: st.DrawFn) -> Bad:
    what = draw(st.sampled_from(sorted(BROKEN_INTEGRATIONS)))
    definition, results = BROKEN_INTEGRATIONS[what]
    execution_id = new_id()
    digest = uuid.uuid4().hex
    raw = encoder.encode(definition)
    if draw(st.booleans()) and what == "unknown runtime":
        raw = draw(garbage)  # not even msgpack
    body = execution_body(execution_id, digest)
    return Bad(what, {b"e": body}, raw, digest, execution_id, results)


def dead_letters(client: redis.Redis, keys: Keys) -> dict[bytes, dict[bytes, bytes]]:
    return {fields[b"entry_id"]: fields for _, fields in client.xrange(keys.dead(0))}


def check_reason(reason: bytes, bad: Bad) -> None:
    text = reason.decode("utf-8")  # readable: text, not the entry's bytes
    assert text.strip() and len(text) <= REASON_MAX, (bad.what, text[:200])
    assert text.isprintable(), (bad.what, text[:200])


@pytest.fixture
def worker(serve: ServeFactory, durable_redis: DurableRedis) -> Daemon:
    return serve(redis_url=durable_redis.url, concurrency=4, max_deliveries=2, claim_idle_s=2)


@pytest.mark.chaos
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bad=st.one_of(undecodable(), unknown(), broken_integration()))
def test_malformed_entries_are_dead_lettered_and_good_ones_around_them_succeed(
    worker: Daemon, durable_redis: DurableRedis, prefix: str, bad: Bad
) -> None:
    keys = Keys(prefix, 1)
    client = durable_redis.client()
    if bad.integration is not None:
        client.set(keys.integration(0, bad.digest), bad.integration, px=600_000)
    if bad.execution_id:
        client.set(keys.input(bad.execution_id), encoder.encode(1), px=600_000)

    async def around() -> list[Any]:
        async with Client.connect(durable_redis.url, prefix) as runnerd:
            before = await runnerd.submit(GOOD, 1)
            entry_id = client.xadd(keys.work(0), bad.fields)
            after = await runnerd.submit(GOOD, 2)
            results = [await runnerd.wait(i, WAIT_S) for i in (before, after)]
            outcome = await runnerd.wait(bad.execution_id, WAIT_S) if bad.execution_id else None
            return [entry_id, results, outcome]

    entry_id, goods, outcome = asyncio.run(around())
    assert [(r.status, r.output) for r in goods] == [("succeeded", 2), ("succeeded", 3)]
    if outcome is not None:
        assert outcome.status in bad.results, (bad.what, outcome.status, outcome.error)
        assert outcome.error is not None and outcome.error.message, bad.what
    if outcome is None or outcome.status == "dead":
        letters = wait_for(
            lambda: dead_letters(client, keys).get(entry_id), WAIT_S, f"{bad.what} dead-lettered"
        )
        check_reason(letters[b"reason"], bad)
    assert worker.is_alive()
    client.close()


def test_a_giant_entry_is_kept_whole_in_the_dead_letter(
    worker: Daemon, durable_redis: DurableRedis, prefix: str
) -> None:
    """The dead-letter stream keeps the raw entry for inspection, whatever its size."""
    keys = Keys(prefix, 1)
    client = durable_redis.client()
    body = os.urandom(1024 * 1024)
    entry_id = client.xadd(keys.work(0), {b"e": body})
    letter = wait_for(lambda: dead_letters(client, keys).get(entry_id), WAIT_S, "dead letter")
    assert letter[b"entry"] == body
    assert letter[b"reason"].startswith(b"undecodable entry")
