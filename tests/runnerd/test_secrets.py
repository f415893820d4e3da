"""Secrets by reference through a real `runnerd serve`: a step's `{"secret": NAME}` env value
reaches the step allowed it (Python and JavaScript), and its value is found nowhere else: not
in any Redis key of the deployment (integration, checkpoint, result, completions), not in the
serve process's log, not in what the client reads (stdout, stderr, ctx.log, error, output).
Refusals (not allowed, not defined) fail the step with `secret`, unretried; bad names and a bad
allowlist are one line at submit or start."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from runnerd.client import Client
from runnerd.keys import Keys
from runnerd.messages import (
    Integration,
    ItemResult,
    checkpoint_decoder,
    execution_decoder,
)
from tests.runnerd.conftest import (
    SHARED_REDIS_URL,
    Daemon,
    ServeFactory,
    run_one,
    wait_all,
    wait_for,
)
from tests.runnerd.test_commands import one_line, runnerd

# Step uids of this module's own (a range the hostile suite's UID_BASE leaves free).
UID_BASE = int(os.environ.get("RUNNERD_TEST_UID_BASE", "300000")) + 1000
ALLOW = "orders=API_KEY,PARTNER_TOKEN,NOT_SET,SHORT;o-*=PARTNER_*"

LEAK_PY = """
import hashlib, sys, time

def run(input, ctx):
    token, partner = os_env("TOKEN"), os_env("PARTNER")
    print("stdout", token, partner)
    print("stderr", token, file=sys.stderr)
    ctx.log(f"log {token} {partner}")
    return {"wait_s": input["wait_s"], "token": token, "partner": partner,
            "nested": [{token: token.encode()}],
            "sha": hashlib.sha256(token.encode()).hexdigest(),
            "partner_sha": hashlib.sha256(partner.encode()).hexdigest()}

def os_env(name):
    import os
    return os.environ[name]
"""
# Runs while the test reads the checkpoint the first step left in Redis.
WAIT_PY = """
import time

def run(input, ctx):
    time.sleep(float(input.get("wait_s", 0)))
    return input
"""
LEAK_JS = """
import { createHash } from "node:crypto";
export function run(input, ctx) {
  const token = process.env.TOKEN;
  console.log("node stdout", token);
  console.error("node stderr", token);
  ctx.log(`node log ${token}`);
  return { ...input, node: token, node_sha: createHash("sha256").update(token).digest("hex") };
}
"""
FAIL_PY = """
def run(input, ctx):
    import os
    raise ValueError("could not log in with " + os.environ["TOKEN"])
"""

LOGIN_PY = """
import os

def run(input, ctx):
    token = os.environ["TOKEN"]
    print("login", token)
    ctx.log(f"login {token}")
    return {"items": [0, 1], "token": token}
"""
# Item 1 is still running when its worker is killed.
ITEM_PY = """
import os, time

def run(input, ctx):
    token = os.environ["TOKEN"]
    print("item", input, token)
    ctx.log(f"item {input} {token}")
    if input == 1:
        time.sleep(60)
    return {"n": input, "token": token}
"""


def leaking_integration(name: str, tmp_path: Path, wait_s: float = 0.0) -> Integration:
    for file, text in (("leak.py", LEAK_PY), ("wait.py", WAIT_PY), ("leak.mjs", LEAK_JS)):
        (tmp_path / file).write_text(text)
    secret_env = {"TOKEN": {"secret": "API_KEY"}, "PARTNER": {"secret": "PARTNER_TOKEN"}}
    spec = {
        "name": name,
        "steps": [
            {"name": "leak", "code": "leak.py", "env": secret_env},
            {"name": "wait", "code": "wait.py"},
            {"name": "node", "code": "leak.mjs", "env": {"TOKEN": {"secret": "API_KEY"}}},
        ],
    }
    return Integration.from_dict(spec, tmp_path)


def secret_value() -> str:
    return "sk-" + secrets.token_hex(16)


def secrets_dir(tmp_path: Path, files: dict[str, str], mode: int = 0o700) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir()
    for name, value in files.items():
        (directory / name).write_text(value + "\n")  # as `echo` writes it: the \n is dropped
        (directory / name).chmod(0o400)
    directory.chmod(mode)
    return directory


def start(serve: ServeFactory, directory: Path, api_key: str, **settings: Any) -> Daemon:
    return serve(
        secrets_dir=str(directory),
        secrets_allow=ALLOW,
        secret_api_key=api_key,  # RUNNERD_SECRET_API_KEY
        log_level="debug",
        sandbox_uid_base=UID_BASE,
        **settings,
    )


def everything_stored(client: redis.Redis, prefix: str) -> bytes:
    """Every value of every key of the deployment, read by type (DUMP would compress them)."""
    found = []
    for key in client.scan_iter(match=f"{{{prefix}*"):
        kind = client.type(key).decode()
        if kind == "string":
            found.append(client.get(key) or b"")
        elif kind == "stream":
            found += [repr(entry).encode() for entry in client.xrange(key)]
        elif kind == "hash":
            found.append(repr(client.hgetall(key)).encode())
        elif kind == "zset":
            found.append(repr(client.zrange(key, 0, -1)).encode())
        elif kind == "list":
            found.append(repr(client.lrange(key, 0, -1)).encode())
        elif kind == "set":
            found.append(repr(client.smembers(key)).encode())
        found.append(key)
    return b"\n".join(found)


def result_text(result: Any) -> str:
    """What the client gets, as one text: the decoded output, and the result's bytes."""
    return repr(result.output) + repr(msgspec.msgpack.encode(result.raw))


def test_a_secret_reaches_the_allowed_steps_and_is_masked_everywhere(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis, tmp_path: Path
) -> None:
    api_key, partner = secret_value(), secret_value()
    daemon = start(serve, secrets_dir(tmp_path, {"PARTNER_TOKEN": partner}), api_key)
    integration = leaking_integration("orders", tmp_path)
    stored_integration = msgspec.msgpack.encode(integration)
    assert b"API_KEY" in stored_integration and api_key.encode() not in stored_integration

    result = run_one(integration, {"wait_s": 0}, prefix)

    assert result.status == "succeeded", result.error
    output = result.output
    # Each step had the values: their hashes are right, the values themselves masked.
    assert output["sha"] == hashlib.sha256(api_key.encode()).hexdigest()
    assert output["partner_sha"] == hashlib.sha256(partner.encode()).hexdigest()
    assert output["node_sha"] == output["sha"]
    assert output["token"] == output["node"] == output["partner"] == "***"
    assert output["nested"] == [{"***": b"***"}]
    leak, _, node = (report.outcome for report in result.steps)
    assert "stdout *** ***" in leak.stdout and "stderr ***" in leak.stderr
    assert leak.logs == ["INFO log *** ***"]
    assert "node stdout ***" in node.stdout and "node stderr ***" in node.stderr
    assert node.logs == ["INFO node log ***"]
    for value in (api_key, partner):
        assert value not in result_text(result)
        assert value.encode() not in everything_stored(shared_redis, prefix)
        assert value not in daemon.log()


def test_the_checkpoint_between_steps_is_masked(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis, tmp_path: Path
) -> None:
    api_key = secret_value()
    start(serve, secrets_dir(tmp_path, {"PARTNER_TOKEN": secret_value()}), api_key)
    integration = leaking_integration("orders", tmp_path)

    async def submit() -> str:
        async with Client.connect(SHARED_REDIS_URL, prefix) as client:
            return await client.submit(integration, {"wait_s": 3})

    execution_id = asyncio.run(submit())
    key = Keys(prefix, 1).checkpoint(execution_id)
    stored = wait_for(lambda: shared_redis.get(key), 20, "the checkpoint after the first step")
    checkpoint = checkpoint_decoder.decode(stored)
    assert checkpoint.next_step == 1
    assert msgspec.msgpack.decode(checkpoint.payload)["token"] == "***"
    assert checkpoint.steps[0].outcome.logs[0].startswith("INFO log ***")
    assert api_key.encode() not in stored
    assert api_key.encode() not in everything_stored(shared_redis, prefix)


def test_an_error_message_with_the_secret_is_masked(
    serve: ServeFactory, prefix: str, tmp_path: Path
) -> None:
    api_key = secret_value()
    daemon = start(serve, secrets_dir(tmp_path, {}), api_key)
    spec = {
        "name": "orders",
        "steps": [{"name": "login", "source": FAIL_PY, "env": {"TOKEN": {"secret": "API_KEY"}}}],
    }
    result = run_one(Integration.from_dict(spec), None, prefix)

    assert result.status == "failed"
    assert result.error is not None and result.error.type == "exception"
    assert "ValueError: could not log in with ***" in result.error.message
    assert api_key not in result_text(result)
    assert api_key not in daemon.log()


def secret_step(name: str, secret: str) -> Integration:
    source = "def run(input, ctx):\n    return 'ran'\n"
    step = {"name": "use", "source": source, "env": {"TOKEN": {"secret": secret}}}
    return Integration.from_dict({"name": name, "retries": 2, "steps": [step]})


@pytest.mark.parametrize(
    ("integration", "secret", "expected"),
    [
        ("intruder", "API_KEY", "secret API_KEY is not allowed for integration 'intruder'"),
        ("o-west", "API_KEY", "secret API_KEY is not allowed for integration 'o-west'"),
        ("orders", "NOT_SET", "secret NOT_SET is not defined on this worker"),
        ("orders", "SHORT", "secret SHORT is shorter than 8 bytes"),
        ("o-west", "PARTNER_OPEN", "is readable by every user"),
    ],
)
def test_a_secret_the_step_cannot_have_fails_it_unretried(
    serve: ServeFactory, prefix: str, tmp_path: Path, integration: str, secret: str, expected: str
) -> None:
    api_key = secret_value()
    directory = secrets_dir(tmp_path, {"SHORT": "abc"}, mode=0o755)
    (directory / "PARTNER_OPEN").write_text(api_key)
    (directory / "PARTNER_OPEN").chmod(0o644)  # a step without a filesystem view could read it
    start(serve, directory, api_key)

    started = time.monotonic()
    result = run_one(secret_step(integration, secret), None, prefix)

    assert result.status == "failed"
    assert result.error is not None and result.error.type == "secret"
    assert expected in result.error.message
    assert result.attempts == 1 and time.monotonic() - started < 5  # no retry with backoff
    assert result.output is None and result.steps[0].outcome.stdout == ""
    assert api_key not in result_text(result) and "abc" not in result.error.message


def test_a_bad_secret_name_in_the_integration_file_names_the_field(tmp_path: Path) -> None:
    spec = {"name": "x", "steps": [{"name": "s", "source": "def run(i, c): pass"}]}
    spec["steps"][0]["env"] = {"TOKEN": {"secret": "../etc/passwd"}}
    path = tmp_path / "integration.json"
    path.write_text(json.dumps(spec))

    done = runnerd("submit", str(path), REDIS_URL=SHARED_REDIS_URL)

    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "`$.steps[0].env.TOKEN.secret`: '../etc/passwd' is not a secret name" in line


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("RUNNERD_SECRETS_ALLOW", "orders", "RUNNERD_SECRETS_ALLOW: entry 1 ('orders'): expected"),
        ("RUNNERD_SECRETS_ALLOW", "a=B;c=../d", "entry 2 ('c=../d'): '../d' is not a secret"),
        ("RUNNERD_SECRET_my-key", "0123456789", "RUNNERD_SECRET_my-key: 'my-key' is not a"),
        ("RUNNERD_SECRETS_DIR", "/nonexistent", "RUNNERD_SECRETS_DIR: '/nonexistent' is not a"),
    ],
)
def test_bad_secrets_configuration_is_one_line_at_start(
    variable: str, value: str, expected: str
) -> None:
    done = runnerd("serve", timeout_s=30, REDIS_URL=SHARED_REDIS_URL, **{variable: value})

    assert done.returncode == 2
    assert expected in one_line(done.stderr)


def test_an_encoded_secret_is_not_masked(serve: ServeFactory, prefix: str, tmp_path: Path) -> None:
    """What masking cannot do (docs/SECURITY.md): a step that encodes the value gets it out."""
    api_key = secret_value()
    start(serve, secrets_dir(tmp_path, {}), api_key)
    source = "import base64, os\ndef run(i, c):\n    return base64.b64encode(os.environb[b'T'])"
    step = {"name": "encode", "source": source, "env": {"T": {"secret": "API_KEY"}}}
    result = run_one(Integration.from_dict({"name": "orders", "steps": [step]}), None, prefix)

    assert result.status == "succeeded"
    assert base64.b64decode(result.output).decode() == api_key


def test_a_loop_item_refused_a_secret_is_not_retried(
    serve: ServeFactory, prefix: str, tmp_path: Path
) -> None:
    """Items share the executions' list of errors no retry can change: an item's own retries
    would find the same allowlist."""
    api_key = secret_value()
    start(serve, secrets_dir(tmp_path, {}), api_key)
    step = {"name": "use", "source": "def run(i, ctx):\n    return i\n"}
    step["env"] = {"TOKEN": {"secret": "API_KEY"}}
    loop = {"steps": [step], "retries": 3, "on_item_error": "collect"}
    integration = Integration.from_dict(
        {"name": "intruder", "steps": [{"name": "each", "for_each": loop}]}
    )

    result = run_one(integration, [0, 1], prefix)

    assert result.status == "succeeded", result.error
    assert [item["error"]["type"] for item in result.output] == ["secret", "secret"]
    counts = result.steps[0].items
    assert counts is not None and (counts.failed, counts.retried) == (2, 0)


def test_a_dead_letter_of_an_execution_that_used_a_secret_holds_no_value(
    serve: ServeFactory, prefix: str, shared_redis: redis.Redis, tmp_path: Path
) -> None:
    """The real way to a dead letter: the worker running the execution dies (SIGKILL) after
    its steps had the secret, and the one that takes the entry over finds it delivered once
    more than RUNNERD_MAX_DELIVERIES allows. What the execution left in Redis (its loop's
    finished item, kept with the dead letter) carries `***`, never the value."""
    api_key = secret_value()
    directory = secrets_dir(tmp_path, {})
    settings = {"max_deliveries": 1, "claim_idle_s": 1}
    first = start(serve, directory, api_key, **settings)
    env = {"TOKEN": {"secret": "API_KEY"}}
    loop = {"items": "items", "parallelism": 1}
    loop["steps"] = [{"name": "use", "source": ITEM_PY, "env": env}]
    spec = {
        "name": "orders",
        "steps": [
            {"name": "login", "source": LOGIN_PY, "env": env},
            {"name": "each", "for_each": loop},
        ],
    }
    integration = Integration.from_dict(spec)
    keys = Keys(prefix, 1)

    async def submit() -> str:
        async with Client.connect(SHARED_REDIS_URL, prefix) as client:
            return await client.submit(integration, None)

    execution_id = asyncio.run(submit())
    items = keys.loop_items(execution_id, 1, 0)  # loop step 1, items 0..255
    wait_for(
        lambda: shared_redis.hexists(items, "r0") and shared_redis.hexists(items, "s1"),
        30,
        "item 0 ended with the secret, item 1 running",
    )
    os.killpg(first.pid, signal.SIGKILL)  # the worker, its zygote and the step: a crash
    first.process.wait(10)
    second = start(serve, directory, api_key, **settings)
    (result,) = asyncio.run(wait_all(SHARED_REDIS_URL, prefix, [execution_id], timeout_s=30))

    reason = "delivered 2 times (limit 1)"
    assert result.status == "dead"
    assert result.error is not None and result.error.message == reason
    ((_, letter),) = shared_redis.xrange(keys.dead(0))
    assert letter[b"reason"].decode() == reason
    assert execution_decoder.decode(letter[b"entry"]).execution_id == execution_id
    # Item 0's end stays with the dead letter (expiring with the result), masked.
    kept = msgspec.msgpack.decode(shared_redis.hget(items, "r0") or b"", type=ItemResult)
    assert msgspec.msgpack.decode(kept.output) == {"n": 0, "token": "***"}
    stored = everything_stored(shared_redis, prefix)
    assert execution_id.encode() in stored and b"API_KEY" in stored  # read, not empty
    assert api_key.encode() not in stored
    for daemon in (first, second):
        assert api_key not in daemon.log()
