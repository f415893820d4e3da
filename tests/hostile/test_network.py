"""A step without network tries to reach one anyway: the Redis on loopback, DNS, the cloud
metadata and credential endpoints, netlink, and the 32-bit system call ABIs that a seccomp
filter written for x86_64 alone would miss. With --network the same Redis answers, which is
what shows these tests can fail."""

from __future__ import annotations

import json

import pytest

from tests.hostile.conftest import RunStep, Witnesses, redis_pings

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
    assert redis_pings(redis_port)
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
