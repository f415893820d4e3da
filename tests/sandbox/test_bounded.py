"""The bounded decoder's scan (sandbox/bounded.py): it agrees with msgspec on every msgpack
type, counts items and depth exactly, refuses past the bounds before anything is built, and
says clearly when the bytes are not one msgpack value."""

from __future__ import annotations

import datetime
import mmap
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox import bounded
from sandbox.bounded import DecodeLimitError


def count_items(value: Any) -> int:
    """Items as the bound counts them: every object, map keys and values included."""
    if isinstance(value, list | tuple):
        return 1 + sum(count_items(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(count_items(k) + count_items(v) for k, v in value.items())
    return 1


def depth_of(value: Any) -> int:
    if isinstance(value, list | tuple):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary())
    | st.datetimes(timezones=st.just(datetime.UTC))
)
keys = st.text() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(keys, inner, max_size=8),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_every_value_round_trips_with_its_exact_item_count(value: Any) -> None:
    data = msgspec.msgpack.encode(value)
    assert bounded.check(data) == count_items(value)
    assert bounded.decode(data) == msgspec.msgpack.decode(data)


# Every header width msgpack has, built by hand (msgspec picks the smallest, and never float32).
HEADERS = {
    "float32": (b"\xca" + struct.pack(">f", 1.5), 1),
    "uint8..64": (b"\x94\xcc\x01\xcd\x00\x01\xce\x00\x00\x00\x01\xcf" + b"\x00" * 7 + b"\x01", 5),
    "int8..64": (b"\x94\xd0\xff\xd1\xff\xff\xd2" + b"\xff" * 4 + b"\xd3" + b"\xff" * 8, 5),
    "str8/16/32": (b"\x93\xd9\x01a\xda\x00\x01a\xdb\x00\x00\x00\x01a", 4),
    "bin8/16/32": (b"\x93\xc4\x01a\xc5\x00\x01a\xc6\x00\x00\x00\x01a", 4),
    "fixext1..16": (b"\x95" + b"".join(bytes([0xD4 + i, 1]) + b"x" * 2**i for i in range(5)), 6),
    "ext8/16/32": (b"\x93\xc7\x01\x01x\xc8\x00\x01\x01x\xc9\x00\x00\x00\x01\x01x", 4),
    "array16/32": (b"\x92\xdc\x00\x01\xc0\xdd\x00\x00\x00\x01\xc0", 5),
    "map16/32": (b"\x92\xde\x00\x01\x01\x02\xdf\x00\x00\x00\x01\x03\x04", 7),
    "empty containers": (b"\x94\x80\x90\xdc\x00\x00\xdf\x00\x00\x00\x00", 5),
}


@pytest.mark.parametrize("name", HEADERS)
def test_every_header_width(name: str) -> None:
    data, items = HEADERS[name]
    assert bounded.check(data) == items
    msgspec.msgpack.decode(data)  # and it is valid msgpack


def nested(depth: int, innermost: bytes = b"\xc0") -> bytes:
    return b"\x91" * depth + innermost


@pytest.mark.parametrize("innermost", [b"\xc0", b"\x90", b"\x80"], ids=["nil", "[]", "{}"])
def test_depth_bound_is_exact(innermost: bytes) -> None:
    value = nested(9, innermost)
    depth = 9 + (innermost != b"\xc0")  # an empty container is a level too
    assert depth_of(msgspec.msgpack.decode(value)) == depth
    bounded.check(value, max_depth=depth)
    with pytest.raises(DecodeLimitError, match=f"deeper than {depth - 1} levels") as refused:
        bounded.check(value, max_depth=depth - 1)
    assert (refused.value.bound, refused.value.limit) == ("depth", depth - 1)


def test_map_values_nest_too() -> None:
    value = msgspec.msgpack.encode({"a": {"b": {"c": [1]}}})
    bounded.check(value, max_depth=4)
    with pytest.raises(DecodeLimitError):
        bounded.check(value, max_depth=3)


def test_item_bound_is_exact() -> None:
    value = msgspec.msgpack.encode([{"k": [1, 2]}, "s", b"b"])  # 1 + (1 + 1 + (1 + 2)) + 2
    assert bounded.check(value, max_items=8) == 8
    with pytest.raises(DecodeLimitError, match="more than 7 items") as refused:
        bounded.check(value, max_items=7)
    assert (refused.value.bound, refused.value.limit) == ("items", 7)


def test_strings_cost_one_item_whatever_their_size() -> None:
    data = msgspec.msgpack.encode([b"\x91" * 10_000_000, "\x91" * 1_000_000])
    started = time.perf_counter()
    assert bounded.check(data, max_items=3) == 3
    assert time.perf_counter() - started < 0.05


def test_hostile_item_count_is_refused_at_its_header() -> None:
    # [{}] * 16_000_000 as a step encodes it: 16 MB, 1.2 GB once decoded.
    data = b"\xdd" + struct.pack(">I", 16_000_000) + b"\x80" * 16_000_000
    started = time.perf_counter()
    with pytest.raises(DecodeLimitError, match="more than 2,000,000 items"):
        bounded.decode(data)
    assert time.perf_counter() - started < 0.05


def test_item_count_adding_up_past_the_bound_stops_there() -> None:
    # No one header passes the bound: 1.1 M small lists of 15 items do, about 1/8 of the way in.
    data = b"\xdd" + struct.pack(">I", 1_100_000) + (b"\x9f" + b"\x80" * 15) * 1_100_000
    with pytest.raises(DecodeLimitError, match="more than 2,000,000 items"):
        bounded.check(data)


def test_deep_nesting_is_refused_without_recursion() -> None:
    with pytest.raises(DecodeLimitError, match="deeper than 64 levels"):
        bounded.decode(nested(100_000))


TRUNCATED = [
    b"",
    b"\x92\x01",  # an array short of an item
    b"\xcd\x01",  # a uint16 short of a byte
    b"\xa5abc",  # a fixstr short of two bytes
    b"\xdb\x00\x00\x10\x00abc",  # a str32 announcing 4 KB
    b"\xdd\x00\x00",  # an array32 cut inside its header
    b"\x81\xa1k",  # a map key without its value
]


@pytest.mark.parametrize("data", TRUNCATED)
def test_truncated_input_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError, match="truncated"):
        bounded.check(data)


@settings(max_examples=100, deadline=None)
@given(values, st.data())
def test_every_strict_prefix_is_truncated(value: Any, data: st.DataObject) -> None:
    encoded = msgspec.msgpack.encode(value)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(msgspec.DecodeError, match="truncated"):
        bounded.check(encoded[:cut])


def test_bytes_after_the_value_and_unused_bytes_are_decode_errors() -> None:
    with pytest.raises(msgspec.DecodeError, match="2 bytes after the msgpack value"):
        bounded.check(b"\x01\x02\x03")
    with pytest.raises(msgspec.DecodeError, match="invalid msgpack byte 0xc1 at 1"):
        bounded.check(b"\x91\xc1")


def as_mmap(data: bytes) -> mmap.mmap:
    buffer = mmap.mmap(-1, len(data))
    buffer[:] = data
    return buffer


BUFFERS: dict[str, Callable[[bytes], Any]] = {
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "mmap": as_mmap,
    "Raw": msgspec.Raw,
}


@pytest.mark.parametrize("kind", BUFFERS)
def test_every_buffer_kind_across_chunk_boundaries(kind: str) -> None:
    # Items of every size straddle the 1 MB windows other buffers are read through.
    value = [[i, "s" * (i % 40), b"b" * (i % 300), {"k": 2**40 + i}] for i in range(30_000)]
    data = msgspec.msgpack.encode(value)
    assert len(data) > 3 * bounded.CHUNK_BYTES
    buffer = BUFFERS[kind](data)
    assert bounded.check(buffer) == count_items(value)
    with pytest.raises(msgspec.DecodeError, match="truncated"):
        bounded.check(BUFFERS[kind](data[:-1]))
    if isinstance(buffer, mmap.mmap):
        buffer.close()  # the scan let go of its view: an exported mmap cannot be closed
