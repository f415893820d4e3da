"""JavaScript steps forked from the node zygote: each child is a copy of one warm node, so what
a copy could share with its siblings or its zygote is tried here, under both profiles: the
layers, randomness, pids, fds, the end of a step that leaves in node's own ways, and the way
back to a node per step when the fork path is off or broken."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

from runnerd.spawner import Spawner, StepSpec
from runnerd.zygote_link import SandboxOptions
from tests.conftest import doctor_report, run_step_file, runnerd_env
from tests.hostile.conftest import UID_BASE, RunSequence, RunStep

TRIVIAL_PY = "def run(input, ctx):\n    return input\n"
TRIVIAL_JS = "export function run(input) { return input; }\n"

IDENTITY_STEP = """
import fs from "node:fs";
import crypto from "node:crypto";
import vm from "node:vm";
import v8 from "node:v8";
import { execFileSync } from "node:child_process";

export function run() {
  const fds = {};
  for (const fd of fs.readdirSync("/proc/self/fd")) {
    try {
      const info = fs.fstatSync(Number(fd));
      // The null device by its number: its path depends on where it was opened from.
      const isNull = info.isCharacterDevice() && info.rdev === 259;
      fds[fd] = isNull ? "null" : fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch { /* the listing's own, closed by now */ }
  }
  return {
    pid: process.pid,
    proc_pid: Number(fs.readFileSync("/proc/self/stat", "utf8").split(" ")[0]),
    argv: process.argv.slice(1),
    math: [Math.random(), Math.random(), Math.random()],
    bytes: crypto.randomBytes(16).toString("hex"),
    uuid: crypto.randomUUID(),
    web: Buffer.from(crypto.webcrypto.getRandomValues(new Uint8Array(16))).toString("hex"),
    vm: [vm.runInNewContext("Math.random()"), new vm.Script("Math.random()").runInNewContext()],
    heap_mb: v8.getHeapStatistics().heap_size_limit / 1048576,
    // What a program the step runs holds: its stdio and the listing's own fd, nothing more.
    child_fds: execFileSync("/bin/ls", ["/proc/self/fd"]).toString().split(/\\s+/).filter(Boolean),
    fds,
  };
}
"""


def test_a_forked_js_child_gets_every_layer_a_python_child_gets(
    run_sequence: RunSequence, profile: str
) -> None:
    python, javascript = run_sequence([(TRIVIAL_PY, ".py", 1), (TRIVIAL_JS, ".mjs", 2)])

    assert python["ok"] and javascript["ok"], (python, javascript)
    assert javascript["layers"] == python["layers"]
    required = {"close_fds", "uid_drop", "rlimits", "no_new_privs", "seccomp"}
    assert required <= set(javascript["layers"])
    if profile == "full":
        assert {"userns", "pidns", "mountns", "fs_view", "netns"} <= set(javascript["layers"])


def test_doctor_says_js_steps_are_forked(profile: str) -> None:
    report = doctor_report(profile)
    assert report["javascript"] == "forked from the node zygote", report["javascript"]


def test_a_forked_js_child_gets_the_heap_limit_of_its_memory_limit(run_step: RunStep) -> None:
    # V8 fixes its heap limit when node starts: a node zygote per limit in use, as a node
    # started per step gets --max-old-space-size at 3/4 of --memory-mb.
    for memory_mb in (256, 2048):
        result = run_step(IDENTITY_STEP, "--memory-mb", str(memory_mb), suffix=".mjs")
        assert result.exit_code == 0, result.report
        heap = result.output["heap_mb"]
        assert memory_mb * 3 // 4 <= heap <= memory_mb * 3 // 4 + 64, (memory_mb, heap)
        assert not result.output["argv"][0].endswith("node_runner.cjs")


def test_each_forked_child_has_its_own_pid_randomness_and_fds(
    run_sequence: RunSequence, profile: str
) -> None:
    reports = run_sequence([(IDENTITY_STEP, ".mjs")] * 4)
    outputs = [report["output"] for report in reports]
    assert all(report["ok"] for report in reports), reports

    for out in outputs:
        assert out["pid"] == out["proc_pid"]  # not the zygote's, which node read at its start
        assert out["argv"] == [out["argv"][0]]  # the zygote's addon and fds are not the step's
        # Nothing the zygote held: the four fds of every child, and beyond them only /dev/null
        # in the zygote's old numbers and the event loop's own, made in this child.
        beyond = {fd: target for fd, target in out["fds"].items() if int(fd) > 3}
        assert out["fds"]["0"] == "null" and out["fds"]["3"].startswith("socket:")
        kinds = {target.split(":")[0] for target in beyond.values()}
        assert kinds <= {"null", "anon_inode", "pipe"}, beyond
        assert len(out["child_fds"]) <= 4, out["child_fds"]
    # The same draws in every child would be the zygote's state, copied.
    for field in ("bytes", "uuid", "web"):
        assert len({out[field] for out in outputs}) == len(outputs), field
    draws = [value for out in outputs for value in out["math"] + out["vm"]]
    assert len(set(draws)) == len(draws)
    assert all(0 <= value < 1 for value in draws)
    # A pipe the zygote had would show the same inode in every child: a channel between them.
    pipes = [
        {t for t in out["fds"].values() if t.startswith("pipe:")} - {out["fds"][n] for n in "12"}
        for out in outputs
    ]
    for one, other in zip(pipes, pipes[1:], strict=False):
        assert not one & other, pipes
    if profile == "fargate":
        pids = {out["pid"] for out in outputs}
        assert len(pids) == len(outputs)


EXIT_STEP = """
export async function run(input) {
  if (input === "exit") process.exit(3);
  if (input === "late-throw") {
    setTimeout(() => { throw new Error("thrown later, in a timer"); }, 10);
    return new Promise(() => {});
  }
  if (input === "pending") return new Promise(() => {}); // the event loop runs out
  if (input === "rejection") {
    Promise.reject(new TypeError("nobody awaited this"));
    return new Promise((resolve) => setTimeout(resolve, 2000));
  }
  return "fine";
}
"""


@pytest.mark.parametrize(
    ("how", "kind", "says"),
    [
        ("exit", "protocol", "exited (status 3) without sending a result"),
        ("late-throw", "exception", "Error: thrown later, in a timer"),
        ("rejection", "exception", "TypeError: nobody awaited this"),
        ("pending", "protocol", "exited (status 0) without sending a result"),
    ],
)
def test_a_forked_js_step_that_leaves_early_ends_at_once_with_the_right_error(
    run_step: RunStep, how: str, kind: str, says: str
) -> None:
    # node's own way out would wait for threads only the zygote has: the step would hang to
    # its wall clock instead of ending.
    result = run_step(EXIT_STEP, "--input", f'"{how}"', "--wall-s", "20", suffix=".mjs")

    assert result.error_type == kind, result.report
    assert says in result.report["error"]["message"]
    assert result.report["duration_s"] < 10, result.report
    follow = run_step(EXIT_STEP, "--input", '"ok"', suffix=".mjs")
    assert follow.output == "fine", follow.report


def test_with_the_fork_path_off_js_steps_start_a_node_each(
    run_step_with_env: RunStep, profile: str
) -> None:
    off = {"RUNNERD_NODE_FORK": "false"}
    result = run_step_with_env(IDENTITY_STEP, off, suffix=".mjs")

    assert result.exit_code == 0, result.report
    assert result.output["argv"][0].endswith("node_runner.cjs")
    javascript = doctor_report(profile, **off)["javascript"]
    assert javascript == "a node started per step: turned off (RUNNERD_NODE_FORK)"


@pytest.fixture
def node_without_addons() -> Iterator[Path]:
    """A node that refuses native addons, outside every temp dir (the node per step it falls
    back to must be reachable by the step's uid; a temp dir's may be 0700)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    directory = Path(tempfile.mkdtemp(prefix="runnerd-test-node-", dir="/run"))
    directory.chmod(0o755)
    wrapper = directory / "node"
    wrapper.write_text(f'#!/bin/sh\nexec {node} --no-addons "$@"\n')
    wrapper.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    yield wrapper
    shutil.rmtree(directory, ignore_errors=True)


def test_a_node_zygote_that_cannot_load_its_addon_falls_back_and_says_why(
    profile: str, node_without_addons: Path, tmp_path: Path
) -> None:
    javascript = doctor_report(profile, RUNNERD_NODE_PATH=str(node_without_addons))["javascript"]
    assert javascript.startswith("a node started per step: "), javascript
    assert "node zygote" in javascript or "forked JS child" in javascript, javascript

    step = tmp_path / "step.mjs"
    step.write_text(IDENTITY_STEP)
    result = run_step_file(
        profile, step, env=runnerd_env(RUNNERD_NODE_PATH=str(node_without_addons))
    )
    assert result.report["ok"], result.report
    assert result.output["argv"][0].endswith("node_runner.cjs")


def _node_zygotes(parent: int) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(parent).children(recursive=True):
        try:
            if any(part.endswith("node_zygote.cjs") for part in process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_when_the_node_zygote_dies_js_steps_go_on_with_a_node_each() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    step = StepSpec("node", "step.mjs", IDENTITY_STEP, msgspec.msgpack.encode(None))

    async def scenario() -> tuple[list[str], list[str]]:
        options = SandboxOptions(uid_base=UID_BASE, slots=8, node_path=node)
        spawner = await Spawner.start(options, pool_size=0)
        try:
            before = await spawner.run_step(step)
            assert before.ok, before
            zygotes = _node_zygotes(os.getpid())
            for _ in range(50):  # the step child, a copy of it, may still be on its way out
                if len(zygotes) == 1:
                    break
                await asyncio.sleep(0.1)
                zygotes = _node_zygotes(os.getpid())
            assert len(zygotes) == 1, zygotes
            zygotes[0].kill()
            zygotes[0].wait(10)
            after = [await spawner.run_step(step) for _ in range(2)]
            assert all(outcome.ok for outcome in after), after
            decode = msgspec.msgpack.decode
            return (
                decode(before.output)["argv"],
                [decode(outcome.output)["argv"][0] for outcome in after],
            )
        finally:
            await spawner.close()

    before, after = asyncio.run(scenario())
    assert not before[0].endswith("node_runner.cjs")
    assert all(argv.endswith("node_runner.cjs") for argv in after)


CONNECT_STEP = """
import net from "node:net";
import fs from "node:fs";

export function run(port) {
  return new Promise((resolve) => {
    const netns = fs.readlinkSync("/proc/self/ns/net");
    const socket = net.connect(port, "127.0.0.1");
    socket.setTimeout(3000, () => { socket.destroy(); resolve([netns, "timeout"]); });
    socket.on("connect", () => { socket.destroy(); resolve([netns, "connected"]); });
    socket.on("error", (err) => resolve([netns, err.code ?? String(err)]));
  });
}
"""


def test_a_step_with_network_leaves_the_next_ones_without(
    run_sequence: RunSequence, profile: str
) -> None:
    # The node zygote clones a step with network from the host's network namespace and goes
    # back to its empty one at once: the steps after it, forked from the same node zygote,
    # must be without network again.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        plan = [False, True, False, True, False]
        reports = run_sequence([(CONNECT_STEP, ".mjs", port, network) for network in plan])
    assert all(report["ok"] for report in reports), reports
    outcomes = [report["output"][1] for report in reports]
    assert outcomes == ["EPERM", "connected", "EPERM", "connected", "EPERM"]  # seccomp's answer
    if "netns" in reports[0]["layers"]:  # and beneath it, no network to reach
        namespaces = [report["output"][0] for report in reports]
        assert len({namespaces[i] for i in (0, 2, 4)}) == 1  # the empty one, shared
        assert namespaces[1] == namespaces[3] != namespaces[0]


SIGNAL_STEP = """
export function run() {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve("not handled"), 5000);
    process.on("SIGUSR2", () => { clearTimeout(timer); resolve("handled"); });
    process.kill(process.pid, "SIGUSR2");
  });
}
"""


def test_a_forked_child_handles_its_own_signals(run_sequence: RunSequence) -> None:
    # libuv's signal lock is a pipe node made before the fork: each child's is /dev/null
    # instead (a shared one would be a channel between steps), which must still work.
    reports = run_sequence([(SIGNAL_STEP, ".mjs")] * 2)
    assert [report.get("output") for report in reports] == ["handled", "handled"], reports


def test_a_node_zygote_that_stops_answering_fails_that_step_and_is_not_used_again() -> None:
    # A fork with no answer may have made a child that holds the step's fds already: that
    # spawn fails (it is not retried with the same fds), and JS steps then start a node each.
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    step = StepSpec("node", "step.mjs", IDENTITY_STEP, msgspec.msgpack.encode(None))

    async def scenario() -> tuple[str, list[str]]:
        options = SandboxOptions(uid_base=UID_BASE, slots=8, node_path=node)
        spawner = await Spawner.start(options, pool_size=0)
        try:
            assert (await spawner.run_step(step)).ok
            (server,) = [z for z in _node_zygotes(os.getpid()) if z.uids().real == 0]
            server.suspend()  # alive, holding its control socket, answering nothing
            stuck = await spawner.run_step(step)
            assert not stuck.ok and stuck.error is not None
            after = [await spawner.run_step(step) for _ in range(2)]
            assert all(outcome.ok for outcome in after), after
            assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
            argv = [msgspec.msgpack.decode(outcome.output)["argv"][0] for outcome in after]
            return stuck.error.type, argv
        finally:
            await spawner.close()

    error_type, argv = asyncio.run(scenario())
    assert error_type == "sandbox"
    assert all(path.endswith("node_runner.cjs") for path in argv)


def test_a_commonjs_step_requires_nothing_from_the_disk_by_name(
    run_step: RunStep, tmp_path: Path
) -> None:
    # Without a filesystem view (Fargate) a step's tmpdir is under the host's /tmp, where any
    # step can write: a package another step planted in /tmp/node_modules must not be what a
    # bare require() finds. Planted here by the test, as that other step would.
    package = f"runnerd-planted-{os.getpid()}"
    planted = Path("/tmp/node_modules") / package
    planted.mkdir(parents=True, exist_ok=True)
    (planted / "index.js").write_text("module.exports = () => 'planted code ran';\n")
    try:
        result = run_step(
            "exports.run = (name) => {\n"
            "  try { return require(name)(); } catch (err) { return err.code; }\n"
            "};\n",
            "--input",
            json.dumps(package),
            suffix=".cjs",
        )
    finally:
        shutil.rmtree(planted, ignore_errors=True)
        with contextlib.suppress(OSError):
            planted.parent.rmdir()
    assert result.report["ok"], result.report
    assert result.output == "MODULE_NOT_FOUND"


def test_a_step_file_name_stays_a_name(profile: str, tmp_path: Path) -> None:
    # The name goes into the step's sourceURL comment: a line separator in it would end the
    # comment and make the rest of the name code.
    name = "a\u2028export function run() { return 'from the name'; }\u2028b.mjs"
    step = tmp_path / name
    step.write_text("// no run() here\n")
    result = run_step_file(profile, step)
    assert result.error_type == "exception", result.report
    assert "exports no run" in result.report["error"]["message"]
