"""The node runner's msgpack codec agrees with msgspec both ways (real node, no mocks)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

CODEC = Path(__file__).resolve().parents[2] / "sandbox" / "runtimes" / "msgpack.cjs"
VALUES = [
    None,
    True,
    False,
    0,
    1,
    127,
    128,
    255,
    256,
    65535,
    65536,
    2**32,
    2**53 - 1,
    -1,
    -32,
    -33,
    -128,
    -129,
    -32768,
    -32769,
    -(2**31),
    -(2**31) - 1,
    -(2**53) + 1,
    1.5,
    -0.25,
    1e300,
    "",
    "é ☃ 𝄞",
    "x" * 31,
    "x" * 32,
    "y" * 70000,
    b"",
    b"\x00\xff",
    b"z" * 70000,
    [],
    [1, [2, [3]]],
    list(range(20)),
    {},
    {"a": 1, "b": {"c": [None]}},
    {str(i): i for i in range(20)},
]
SCRIPT = """
import { decode, encode } from %s;
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
process.stdout.write(encode(decode(new Uint8Array(Buffer.concat(chunks)))));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_round_trip_through_node(value: object) -> None:
    script = SCRIPT % repr(CODEC.as_uri())
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        input=msgspec.msgpack.encode(value),
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert msgspec.msgpack.decode(done.stdout) == value
