"""A chaos-test step that counts its own runs in Redis, like tests/runnerd/steps/counting.py,
but one that survives the faults the chaos test injects into that Redis: it retries the
connection, and a command refused while Redis loads its AOF (neither ran, so retrying cannot
count twice), while the server restarts.

Input: `counters` (key prefix), `redis_port`, `trail` (step names so far); optional
`fail_on_attempt` {step: attempt} raises on that attempt only, `fail` [step, ...] raises always,
`sleep_s` {step: seconds} sleeps before returning.
"""

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


def incr(port, key):
    command = b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key.encode()), key.encode())
    deadline = time.monotonic() + CONNECT_FOR_S
    while True:
        with connect(port) as connection:
            connection.sendall(command)
            reply = connection.recv(64)
        # While it replays its AOF after a restart Redis refuses commands without running them.
        if reply.startswith(b"-LOADING") and time.monotonic() < deadline:
            time.sleep(0.1)
            continue
        if not reply.startswith(b":"):
            raise RuntimeError(f"INCR {key}: {reply!r}")
        return int(reply[1:].split(b"\r\n")[0])


def run(input, ctx):
    runs = incr(input["redis_port"], f"{input['counters']}:{ctx.step}")
    if input.get("fail_on_attempt", {}).get(ctx.step) == ctx.attempt:
        raise ValueError(f"{ctx.step} fails on attempt {ctx.attempt}")
    if ctx.step in input.get("fail", []):
        raise ValueError(f"boom in {ctx.step}")
    sleep_s = input.get("sleep_s", {}).get(ctx.step)
    if sleep_s:
        time.sleep(sleep_s)
    ctx.log.info(f"{ctx.step} run {runs}")
    return {**input, "trail": [*input["trail"], ctx.step]}
