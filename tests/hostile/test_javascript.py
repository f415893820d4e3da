"""The process, network and secret attacks again, from a JavaScript step (forked from the node
zygote, or a node exec'd per step where that is off): it must hold every layer the Python steps
hold. test_node_fork.py tries what a fork of one warm node could share."""

from __future__ import annotations

import json
import os

from tests.hostile.conftest import RunStep, Witnesses

PROCESS_STEP = """
import fs from "node:fs";

function attempt(action) {
  try { action(); return "done"; } catch (err) { return err.code ?? String(err); }
}

export function run(input, ctx) {
  const results = {};
  for (const [name, pid] of Object.entries(input.canaries)) {
    results[`kill ${name}`] = attempt(() => process.kill(pid, "SIGKILL"));
    for (const entry of ["environ", "mem"]) {
      results[`${entry} ${name}`] = attempt(() => fs.readFileSync(`/proc/${pid}/${entry}`));
    }
  }
  if (process.ppid > 1) {
    results["kill parent"] = attempt(() => process.kill(process.ppid, "SIGKILL"));
  }
  results["probe test process"] = attempt(() => process.kill(input.test_pid, 0));
  results["kill(-1)"] = attempt(() => process.kill(-1, "SIGKILL"));
  return results;
}
"""

NETWORK_STEP = """
import dns from "node:dns/promises";
import net from "node:net";
import dgram from "node:dgram";

function connect(host, port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, host);
    socket.setTimeout(2000, () => { socket.destroy(); resolve("timeout"); });
    socket.on("connect", () => socket.write("PING\\r\\n"));
    socket.on("data", (data) => { socket.destroy(); resolve(`ok: ${data.toString().trim()}`); });
    socket.on("error", (err) => resolve(err.code ?? String(err)));
  });
}

function udp() {
  return new Promise((resolve) => {
    try {
      const socket = dgram.createSocket("udp4");
      socket.on("error", (err) => resolve(err.code ?? String(err)));
      socket.send(Buffer.alloc(12), 53, "8.8.8.8", (err) => {
        socket.close();
        resolve(err ? err.code ?? String(err) : "sent");
      });
    } catch (err) {
      resolve(err.code ?? String(err));
    }
  });
}

export async function run(input, ctx) {
  let resolved;
  try { resolved = `ok: ${(await dns.lookup("example.com")).address}`; }
  catch (err) { resolved = err.code ?? String(err); }
  return {
    redis: await connect("127.0.0.1", input.redis_port),
    metadata: await connect("169.254.169.254", 80),
    udp: await udp(),
    resolve: resolved,
  };
}
"""

SECRETS_STEP = """
import fs from "node:fs";

function read(path) {
  try { return fs.readFileSync(path, "latin1"); } catch (err) { return err.code ?? String(err); }
}

export function run(input, ctx) {
  const seen = { env: JSON.stringify(process.env) };
  for (const path of ["/proc/self/environ", "/proc/1/environ", `/proc/${process.ppid}/environ`]) {
    seen[path] = read(path);
  }
  for (const pid of fs.readdirSync("/proc").filter((name) => /^[0-9]+$/.test(name))) {
    seen[`/proc/${pid}/environ`] = read(`/proc/${pid}/environ`);
  }
  seen.private = read(input.private);
  seen.secret = read(input.secret);
  seen.public = read(input.public);
  return seen;
}
"""

FETCH_STEP = """
export async function run(input, ctx) {
  try {
    const response = await fetch(`http://127.0.0.1:${input.redis_port}/`);
    return `status ${response.status}`;
  } catch (err) {
    // Redis answers HTTP with an error and a closed connection: a network-level answer.
    const cause = err.cause ?? err;
    return cause.code === "UND_ERR_SOCKET" || cause.code === "ECONNRESET"
      ? "reached"
      : `${cause.name}: ${cause.message}`;
  }
}
"""

REFUSED = {"EPERM", "ESRCH", "EACCES", "ENOENT"}


def test_javascript_step_cannot_signal_or_read_other_processes(
    run_step: RunStep, witnesses: Witnesses
) -> None:
    attack = {"canaries": witnesses.pids, "test_pid": os.getpid()}
    result = run_step(PROCESS_STEP, "--input", json.dumps(attack), suffix=".mjs")

    assert result.exit_code == 0, result.report
    outcome = result.output
    assert outcome.pop("kill(-1)") in {"done", "ESRCH"}  # done: every target refused (EPERM)
    assert set(outcome.values()) <= REFUSED, outcome
    witnesses.assert_unharmed()


def test_javascript_step_without_network_reaches_nothing(
    run_step: RunStep,
    redis_port: int,
    witnesses: Witnesses,
) -> None:
    port = json.dumps({"redis_port": redis_port})
    refused = run_step(NETWORK_STEP, "--input", port, suffix=".mjs")
    allowed = run_step(NETWORK_STEP, "--input", port, "--network", suffix=".mjs")

    assert refused.exit_code == 0, refused.report
    assert refused.output == {
        "redis": "EPERM",
        "metadata": "EPERM",
        "udp": "EPERM",
        "resolve": refused.output["resolve"],
    }
    assert not refused.output["resolve"].startswith("ok")
    # The same step with --network reaches the host's loopback: the test can fail.
    assert allowed.output["redis"] == "ok: +PONG", allowed.report
    witnesses.assert_unharmed()


def test_javascript_step_cannot_find_the_callers_secrets(
    run_step_with_env: RunStep, witnesses: Witnesses, profile: str
) -> None:
    paths = {
        "private": str(witnesses.private_file),
        "secret": str(witnesses.exposed_secret),
        "public": str(witnesses.exposed_public),
    }
    caller_env = {"HOSTILE_SECRET": witnesses.secret, "REDIS_URL": f"redis://:{witnesses.secret}@x"}
    result = run_step_with_env(
        SECRETS_STEP, caller_env, "--input", json.dumps(paths), suffix=".mjs"
    )

    assert result.exit_code == 0, result.report
    seen = result.output
    # Outside the full profile's filesystem view nothing exists; without a view the path is
    # reachable, and what refuses the secret is its mode.
    expected = "ENOENT" if profile == "full" else witnesses.exposed_public.read_text()
    assert seen.pop("public") == expected
    assert [place for place, text in seen.items() if witnesses.secret in text] == []
    assert seen["private"] in REFUSED and seen["secret"] in REFUSED
    witnesses.assert_unharmed()


def test_javascript_fetch_with_network(
    run_step: RunStep,
    redis_port: int,
    witnesses: Witnesses,
) -> None:
    result = run_step(
        FETCH_STEP, "--network", "--input", json.dumps({"redis_port": redis_port}), suffix=".mjs"
    )

    witnesses.assert_unharmed()
    assert result.output == "reached", result.report
