"""A test step that counts its own runs in Redis and appends its name to `trail`, so a test sees
which steps ran, how often and in which order. It speaks RESP over a raw socket (the sandbox
has no redis package), so it needs "network": true.

Input options: `sleep_first_run` {step: seconds} sleeps on that step's first run only;
`fail` [step, ...] raises in those steps.
"""

import socket
import time


def incr(port, key):
    command = b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key.encode()), key.encode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(command)
        reply = connection.recv(64)
    return int(reply[1:].split(b"\r\n")[0])


def run(input, ctx):
    runs = incr(input["redis_port"], f"{input['counters']}:{ctx.step}")
    sleep_s = input.get("sleep_first_run", {}).get(ctx.step)
    if sleep_s and runs == 1:
        time.sleep(sleep_s)
    if ctx.step in input.get("fail", []):
        raise ValueError(f"boom in {ctx.step}")
    ctx.log.info(f"{ctx.step} run {runs}")
    return {**input, "trail": [*input["trail"], ctx.step]}
