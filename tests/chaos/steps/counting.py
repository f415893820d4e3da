"""A chaos-test step that counts its own runs in Redis, like tests/runnerd/steps/counting.py,
but one that survives the faults the chaos test injects into that Redis: it retries the
connection, a command refused while Redis loads its AOF, and a connection lost before the reply
(Redis killed mid-command). Retrying is safe because a run is counted as a random token added
to a set (SADD): sent twice, it still counts once. The count is the set's size.

Input: `counters` (key prefix), `redis_port`, `trail` (step names so far); optional
`fail_on_attempt` {step: attempt} raises on that attempt only, `fail` [step, ...] raises always,
`sleep_s` {step: seconds} sleeps before returning.
"""

import os
import socket
import time

CONNECT_FOR_S = 30.0


def connect(port):
    deadline = time.monotonic() + CONNECT_FOR_S
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _command(*parts):
    encoded = [part.encode() for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)


def count_run(port, key):
    """Add this run's token to the set `key` and return how many runs it holds."""
    token = os.urandom(8).hex()
    commands = _command("SADD", key, token) + _command("SCARD", key)
    deadline = time.monotonic() + CONNECT_FOR_S
    while True:
        try:
            with connect(port) as connection, connection.makefile("rb") as replies:
                connection.sendall(commands)
                added, size = replies.readline(), replies.readline()
        except OSError:
            added = size = b""  # lost mid-command: the same token again cannot count twice
        # While it replays its AOF after a restart Redis refuses commands without running them.
        retry = not size or added.startswith(b"-LOADING")  # no size: a reply was lost
        if retry and time.monotonic() < deadline:
            time.sleep(0.1)
            continue
        if not (added.startswith(b":") and size.startswith(b":")):
            raise RuntimeError(f"SADD {key}: {added!r} {size!r}")
        return int(size[1:].strip())


def run(input, ctx):
    runs = count_run(input["redis_port"], f"{input['counters']}:{ctx.step}")
    if input.get("fail_on_attempt", {}).get(ctx.step) == ctx.attempt:
        raise ValueError(f"{ctx.step} fails on attempt {ctx.attempt}")
    if ctx.step in input.get("fail", []):
        raise ValueError(f"boom in {ctx.step}")
    sleep_s = input.get("sleep_s", {}).get(ctx.step)
    if sleep_s:
        time.sleep(sleep_s)
    ctx.log.info(f"{ctx.step} run {runs}")
    return {**input, "trail": [*input["trail"], ctx.step]}
