"""A step without network tries to reach one anyway: the Redis on loopback, DNS, the cloud
metadata and credential endpoints, netlink, and the 32-bit system call ABIs that a seccomp
filter written for x86_64 alone would miss. With --network the same Redis answers, which is
what shows these tests can fail.

Unix sockets are the other way out: a datagram socketpair end could send to any Unix
datagram socket on the host by path, and all steps without network share one network
namespace, where an abstract name would let two customers' steps talk. Only stream
socketpairs are left to a step, with or without network, and nothing that gives a socket an
address or a destination."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from runnerd import settings as settings_module
from runnerd.outcomes import outcome_json
from runnerd.spawner import Spawner
from runnerd.zygote_link import SandboxOptions
from tests.conftest import FARGATE_LAUNCHER, ROOT, runnerd_argv, runnerd_env
from tests.hostile.conftest import OTHER_STEP_UID, RunStep, Witnesses, redis_pings
from tests.hostile.sequence import step_spec

NETWORK_STEP = """
import errno, socket

def attempt(action):
    try:
        return "ok: " + repr(action())[:80]
    except socket.gaierror:
        return "gaierror"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def redis_ping(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"PING\\r\\n")
        return s.recv(64).decode()

def connect(host, port):
    with socket.create_connection((host, port), timeout=2):
        return "connected"

def udp_dns():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return s.sendto(b"\\0" * 12, ("8.8.8.8", 53))

def run(input, ctx):
    return {
        "redis": attempt(lambda: redis_ping(input["redis_port"])),
        "resolve": attempt(lambda: socket.getaddrinfo("example.com", 443)),
        "metadata": attempt(lambda: connect("169.254.169.254", 80)),
        "ecs credentials": attempt(lambda: connect("169.254.170.2", 80)),
        "udp": attempt(udp_dns),
        "ipv6 loopback": attempt(lambda: connect("::1", input["redis_port"])),
        "unix": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
        "netlink": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
        "raw": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)),
    }
"""

# Machine code for socket(AF_INET, SOCK_STREAM, 0) through the i386 ABI (int 0x80, call 359)
# and the x32 ABI (syscall 41 with bit 30 set); the return value comes back in rax.
ABI_STEP = """
import ctypes, mmap

CODE = {
    "i386": bytes.fromhex("53b867010000bb02000000b90100000031d2cd805bc3"),
    "x32": bytes.fromhex("b829000040bf02000000be0100000031d20f05c3"),
}

def run(input, ctx):
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(CODE[input])
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_long)(address)()
"""


# Every way to a Unix socket by path or abstract name that a step has without a socket(2) of
# its own, and socket(2) itself; reported as errno names, "ok" where the call went through.
UNIX_STEP = """
import ctypes, errno, fcntl, os, socket

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def raw(number, *args):
    # The system call itself, so that the filter sees arguments with their high bits set.
    if libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)) < 0:
        raise OSError(ctypes.get_errno(), "syscall")

def grow_pipe():
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 1 << 20)

def grow_pipe_high_bits():
    read_end, write_end = os.pipe()
    raw(72, write_end, (1 << 32) | F_SETPIPE_SZ, 1 << 20)

def run(input, ctx):
    host, abstract = input["host_socket"], "\\0" + input["abstract"]
    stream, _ = socket.socketpair()
    flags = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    read_end, write_end = os.pipe()
    return {
        "stream socketpair": attempt(lambda: socket.socketpair(socket.AF_UNIX, flags)),
        "datagram socketpair": attempt(lambda: socket.socketpair(type=socket.SOCK_DGRAM)),
        "seqpacket socketpair": attempt(lambda: socket.socketpair(type=socket.SOCK_SEQPACKET)),
        "unix socket": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)),
        "unix socket, high bits": attempt(lambda: raw(41, (1 << 32) | 1, socket.SOCK_DGRAM, 0)),
        "datagram pair end to host socket": attempt(
            lambda: socket.socketpair(type=socket.SOCK_DGRAM)[0].sendto(b"hostile", host)
        ),
        "sendto host socket": attempt(lambda: stream.sendto(b"hostile", host)),
        "sendmsg host socket": attempt(lambda: stream.sendmsg([b"hostile"], [], 0, host)),
        "sendto abstract name": attempt(lambda: stream.sendto(b"hostile", abstract)),
        "grow a pipe": attempt(grow_pipe),
        "grow a pipe, high bits": attempt(grow_pipe_high_bits),
        "pipe size": str(fcntl.fcntl(write_end, F_GETPIPE_SZ)),
    }
"""

# Two steps at once on one zygote: one tries every way to own an abstract name and waits for
# a message on it, the other keeps trying to reach that name meanwhile.
RENDEZVOUS_STEP = """
import ctypes, errno, socket, time

WAIT_S = 3.0
libc = ctypes.CDLL(None, use_errno=True)

def attempt(action):
    try:
        return action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def datagram_socket():
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

def datagram_pair_end():
    return socket.socketpair(type=socket.SOCK_DGRAM)[0]

def disconnected_datagram_pair_end():
    # connect(2) to AF_UNSPEC drops a datagram socket's peer: then anyone may send to it.
    end = datagram_pair_end()
    unspec = (ctypes.c_ushort * 8)()
    if libc.connect(end.fileno(), unspec, ctypes.sizeof(unspec)) < 0:
        raise OSError(ctypes.get_errno(), "connect")
    return end

def stream_pair_end():
    return socket.socketpair()[0]

MAKERS = {  # the listener binds the first that works to the name
    "datagram socket": datagram_socket,
    "disconnected datagram socketpair": disconnected_datagram_pair_end,
    "datagram socketpair": datagram_pair_end,
    "stream socketpair": stream_pair_end,
}

def listen(name):
    outcome, bound = {}, []
    for how, make in MAKERS.items():
        def bind():
            s = make()
            s.bind(name)
            if s.type == socket.SOCK_STREAM:
                s.listen(1)
            bound.append(s)
            return "ok"
        outcome[how] = attempt(bind)
    heard = []
    deadline = time.monotonic() + WAIT_S
    while bound and time.monotonic() < deadline:
        for s in bound:
            s.settimeout(0.05)
            try:
                heard.append(repr(s.accept() if s.type == socket.SOCK_STREAM else s.recv(64)))
            except (socket.timeout, OSError):
                pass
    outcome["heard"] = heard
    return outcome

def speak(name):
    outcome = {}
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for how, make in MAKERS.items():
            outcome[how + " sendto"] = attempt(lambda: make().sendto(b"hostile", name) and "ok")
            outcome[how + " connect"] = attempt(lambda: make().connect(name) or "ok")
        time.sleep(0.05)
    return outcome

def run(input, ctx):
    name = "\\0" + input["name"]
    return listen(name) if input["role"] == "listen" else speak(name)
"""

# A step with network binds a stream socketpair end to an abstract name of the host's network
# namespace, and holds it: nothing can connect to it (its socket is connected already), but
# a service of the host's that wants the name cannot have it while the step runs.
SQUAT_STEP = """
import socket, time

def run(input, ctx):
    end, _ = socket.socketpair()
    deadline = time.monotonic() + 5
    while True:
        try:
            end.bind("\\0" + input)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    time.sleep(2)
    return "held"
"""


@pytest.fixture
def host_datagram_socket() -> Iterator[tuple[socket.socket, str]]:
    """A Unix datagram socket of the host's that every uid may send to: in a 0777 directory
    outside every temp dir, itself mode 0777."""
    directory = Path(tempfile.mkdtemp(prefix="runnerd-hostile-unix-", dir="/run"))
    directory.chmod(0o777)
    path = str(directory / "listener.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.setblocking(False)
        yield listener, path
    finally:
        listener.close()
        os.unlink(path)
        directory.rmdir()


def received(listener: socket.socket) -> list[bytes]:
    messages = []
    while True:
        try:
            messages.append(listener.recv(4096))
        except BlockingIOError:
            return messages


def assert_reachable_by_a_slot_uid(path: str, listener: socket.socket) -> None:
    """The control: a process of a slot uid, outside the sandbox, does reach the socket; so
    what stops a step is the sandbox, not the file's mode."""
    send = (
        "import socket, sys\n"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'hi', sys.argv[1])\n"
    )
    subprocess.run(
        [sys.executable, "-c", send, path], user=OTHER_STEP_UID, group=OTHER_STEP_UID, check=True
    )
    assert received(listener) == [b"hi"]


def unix_input(path: str) -> str:
    return json.dumps({"host_socket": path, "abstract": f"runnerd-hostile-{os.urandom(6).hex()}"})


def test_step_without_network_reaches_nothing(
    run_step: RunStep, redis_port: int, witnesses: Witnesses
) -> None:
    result = run_step(NETWORK_STEP, "--input", json.dumps({"redis_port": redis_port}))

    assert result.exit_code == 0, result.report
    outcome = result.output
    # socket(2) itself is refused, so nothing that needs a socket gets one, DNS included.
    assert outcome.pop("resolve") == "gaierror"
    assert set(outcome.values()) == {"EPERM"}, outcome
    assert redis_pings(redis_port)
    witnesses.assert_unharmed()


def test_step_with_network_reaches_the_hosts_loopback(
    run_step: RunStep, redis_port: int, witnesses: Witnesses
) -> None:
    result = run_step(NETWORK_STEP, "--network", "--input", json.dumps({"redis_port": redis_port}))

    assert result.exit_code == 0, result.report
    # The host's network, loopback included: what --network exposes (docs/SECURITY.md).
    assert result.output["redis"] == "ok: '+PONG\\r\\n'"
    # ... and netlink for routes (getaddrinfo needs it), but no Unix socket and no raw one.
    assert result.output["netlink"].startswith("ok: "), result.output
    assert (result.output["unix"], result.output["raw"]) == ("EPERM", "EPERM")
    assert redis_pings(redis_port)
    witnesses.assert_unharmed()


# What a step may still do with Unix sockets, with or without network: a stream socketpair,
# which has a peer already and takes no destination (the kernel says EISCONN).
UNIX_OUTCOME = {
    "stream socketpair": "ok",
    "datagram socketpair": "EPERM",
    "seqpacket socketpair": "EPERM",
    "unix socket": "EPERM",
    "unix socket, high bits": "EPERM",
    "datagram pair end to host socket": "EPERM",
    "sendto host socket": "EISCONN",
    "sendmsg host socket": "EISCONN",
    "sendto abstract name": "EISCONN",
    "grow a pipe": "EPERM",
    "grow a pipe, high bits": "EPERM",
    "pipe size": "65536",
}


@pytest.mark.parametrize("network", [False, True], ids=["without network", "with network"])
def test_step_cannot_reach_the_hosts_unix_sockets(
    run_step: RunStep,
    network: bool,
    host_datagram_socket: tuple[socket.socket, str],
    witnesses: Witnesses,
) -> None:
    listener, path = host_datagram_socket
    assert_reachable_by_a_slot_uid(path, listener)

    flags = ("--network",) if network else ()
    result = run_step(UNIX_STEP, *flags, "--input", unix_input(path))

    assert result.exit_code == 0, result.report
    assert result.output == UNIX_OUTCOME
    assert received(listener) == []
    witnesses.assert_unharmed()


def test_steps_cannot_meet_at_an_abstract_name(
    profile: str, tmp_path: Path, witnesses: Witnesses
) -> None:
    step = tmp_path / "rendezvous.py"
    step.write_text(RENDEZVOUS_STEP)
    name = f"runnerd-hostile-{os.urandom(6).hex()}"
    listener, speaker = run_concurrently(
        profile, [(step, {"role": "listen", "name": name}), (step, {"role": "speak", "name": name})]
    )

    assert listener["ok"] and speaker["ok"], (listener, speaker)
    heard = listener["output"].pop("heard")
    # Neither end gets an address: no datagram socket, and bind refused on a stream pair end.
    assert set(listener["output"].values()) == {"EPERM"}, listener["output"]
    assert heard == []
    outcome = speaker["output"]
    assert outcome.pop("stream socketpair sendto") == "EISCONN"
    assert set(outcome.values()) == {"EPERM"}, outcome
    witnesses.assert_unharmed()


@pytest.mark.parametrize("abi", ["i386", "x32"])
def test_32_bit_syscall_abi_cannot_open_a_socket(
    run_step: RunStep, abi: str, witnesses: Witnesses
) -> None:
    result = run_step(ABI_STEP, "--input", json.dumps(abi))

    # A filter that checked only x86_64 numbers would let socket() through here (the i386 ABI
    # is live on this kernel); libseccomp kills any foreign-architecture call instead.
    assert result.error_type == "killed", result.report
    assert "SIGSYS" in result.report["error"]["message"]
    witnesses.assert_unharmed()


def test_step_with_network_cannot_take_an_abstract_name_from_the_host(
    profile: str, tmp_path: Path, witnesses: Witnesses, request: pytest.FixtureRequest
) -> None:
    request.applymarker(
        pytest.mark.xfail(
            strict=True,
            reason="bind(2) stays allowed with network (getaddrinfo binds its netlink socket), "
            "and the filter cannot see a socket's family: a socketpair end takes the name",
        )
    )
    step = tmp_path / "squat.py"
    step.write_text(SQUAT_STEP)
    name = f"runnerd-hostile-{os.urandom(6).hex()}"
    argv = runnerd_argv(profile, "run-step", str(step), "--network", "--input", json.dumps(name))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=runnerd_env())
    taken = False
    deadline = time.monotonic() + 20
    while proc.poll() is None and not taken and time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as service:
            try:
                service.bind("\0" + name)
            except OSError as exc:
                taken = exc.errno == errno.EADDRINUSE
        time.sleep(0.05)
    proc.communicate(timeout=30)

    witnesses.assert_unharmed()
    assert not taken, "the step held an abstract name of the host's network namespace"


# --- two steps at once on one zygote -----------------------------------------------------


def run_concurrently(profile: str, steps: list[tuple[Path, Any]]) -> list[dict[str, Any]]:
    """Run the steps at the same time on one Spawner (one zygote, so the steps without network
    share its network namespace, as a daemon's concurrent steps do); their reports in order.
    This module is the driver: run as a program, it runs the steps it is given (`_gather`)."""
    entries = json.dumps([{"file": str(path), "input": value} for path, value in steps])
    argv = [sys.executable, "-m", "tests.hostile.test_network", entries]
    if profile == "fargate":
        argv = [sys.executable, str(FARGATE_LAUNCHER), *argv]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=runnerd_env(), cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reports: list[dict[str, Any]] = json.loads(done.stdout)
    return reports


async def _gather(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    settings = settings_module.load(dict(os.environ))
    spawner = await Spawner.start(SandboxOptions.from_settings(settings))
    try:
        outcomes = await asyncio.gather(*(spawner.run_step(step_spec(e)) for e in entries))
    finally:
        await spawner.close()
    return [outcome_json(outcome) for outcome in outcomes]


if __name__ == "__main__":
    reports = asyncio.run(_gather(json.loads(sys.argv[1])))
    sys.stdout.write(msgspec.json.encode(reports).decode() + "\n")
