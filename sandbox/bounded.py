"""Bounded decoding: count a msgpack value's items and nesting before anything decodes it.

A step's output is msgpack written by code we do not trust, and its decoded size is not its
encoded size: `[{}] * 16_000_000` is 16 MB of msgpack (one byte per empty map) and 1.2 GB of
Python dicts, and a forged value can nest deep enough for a decoder to raise RecursionError.
`check()` walks the value's headers first and refuses it, before one object is built, when it
has more than `max_items` items (every msgpack object counts: containers, their elements, map
keys and values) or nests deeper than `max_depth` containers. A str, bin or ext is skipped by its
length header, so its size costs nothing: the walk is proportional to the items, not the bytes,
and a container announcing more items than are left is refused at its header.

The defaults, and why. Decoded by msgspec, one item costs at most ~72 bytes of Python memory
beyond the bytes of its strings (an empty dict, 64, plus its slot in its container; measured:
empty list 64, datetime 56, 2-char str 59, float 32, map entry ~66), and a string at most 4 bytes
per encoded byte (UCS-4). So MAX_ITEMS = 2,000,000 bounds a decoded value to ~150 MB plus its
strings, about what the default output limit (128 MB) allows in bytes. MAX_DEPTH = 64 is far
beyond what data nests to (JSON documents seldom pass 20) and far below the interpreter's
recursion limit (1000), which every recursive decoder and encoder downstream must stay under.

Malformed input (a byte msgpack never uses, a value cut short, bytes after it) raises
msgspec.DecodeError, as decoding it would.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from typing import Any, TypeAlias

import msgspec

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap | msgspec.Raw

MAX_ITEMS = 2_000_000
MAX_DEPTH = 64
# Buffers other than bytes are walked through bytes copies of this size: indexing bytes is the
# fastest read Python has (a memoryview or an mmap is ~1.5x slower per item).
CHUNK_BYTES = 1 << 20


class DecodeLimitError(ValueError):
    """A msgpack value passes a decoding bound. `bound` is "items", "depth" or "bytes"
    (a result frame's logs and error), `limit` its value;
    the message reads after "the value has" (e.g. "more than 2,000,000 items ...")."""

    def __init__(self, bound: str, limit: int) -> None:
        if bound == "items":
            message = (
                f"more than {limit:,} items (msgpack objects: containers, their elements, map "
                "keys and values), the bound on what is decoded"
            )
        elif bound == "bytes":
            message = f"logs and an error message of more than {limit:,} bytes together"
        else:
            message = f"containers nested deeper than {limit} levels, the bound on what is decoded"
        super().__init__(message)
        self.bound = bound
        self.limit = limit


# Lead byte -> size of a whole item known from that byte alone (0: not such an item).
_SIZE = [0] * 256
for _b in (*range(0x00, 0x80), 0xC0, 0xC2, 0xC3, *range(0xE0, 0x100)):  # fixint, nil, bool
    _SIZE[_b] = 1
for _b in range(0xA0, 0xC0):  # fixstr
    _SIZE[_b] = 1 + (_b & 0x1F)
for _b, _n in {
    **{0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9},  # uint 8/16/32/64
    **{0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9},  # int 8/16/32/64
    **{0xCA: 5, 0xCB: 9},  # float 32/64
    **{0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18},  # fixext 1/2/4/8/16
}.items():
    _SIZE[_b] = _n
# Lead byte -> number of items a fixmap or fixarray holds (-1: not one).
_COUNT = [-1] * 256
for _b in range(0x80, 0x90):
    _COUNT[_b] = 2 * (_b & 0x0F)
for _b in range(0x90, 0xA0):
    _COUNT[_b] = _b & 0x0F

_U8 = struct.Struct(">B").unpack_from
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_Read = Callable[[Any, int], tuple[Any, ...]]  # a Struct's unpack_from
# bin, str, ext with a length field: lead byte -> (header size, length reader).
_SIZED: dict[int, tuple[int, _Read]] = {
    **{0xC4: (2, _U8), 0xC5: (3, _U16), 0xC6: (5, _U32)},  # bin 8/16/32
    **{0xD9: (2, _U8), 0xDA: (3, _U16), 0xDB: (5, _U32)},  # str 8/16/32
    **{0xC7: (3, _U8), 0xC8: (4, _U16), 0xC9: (6, _U32)},  # ext 8/16/32 (length, then type)
}
# array and map with a count field: lead byte -> (header size, count reader, items per entry).
_COUNTED: dict[int, tuple[int, _Read, int]] = {
    **{0xDC: (3, _U16, 1), 0xDD: (5, _U32, 1)},  # array 16/32
    **{0xDE: (3, _U16, 2), 0xDF: (5, _U32, 2)},  # map 16/32: a key and a value per entry
}


def decode(data: Buffer, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH) -> Any:
    """msgspec.msgpack.decode(data), once check() has let it through."""
    check(data, max_items, max_depth)
    return msgspec.msgpack.decode(data)


def check(data: Buffer, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH) -> int:
    """The number of items of the one msgpack value `data` holds; DecodeLimitError past a bound,
    msgspec.DecodeError when `data` is not exactly one msgpack value."""
    if isinstance(data, bytes):
        return _walk(data, data, max_items, max_depth)
    with memoryview(data) as view:  # released: an mmap with a live export cannot be closed
        return _walk(view, None, max_items, max_depth)


def _walk(view: bytes | memoryview, whole: bytes | None, max_items: int, max_depth: int) -> int:
    try:
        return _items(view, whole, max_items, max_depth)
    except (IndexError, struct.error):
        raise msgspec.DecodeError("msgpack data is truncated") from None


def _items(  # noqa: C901 - one loop on purpose: a call per item would double its cost
    view: bytes | memoryview, whole: bytes | None, max_items: int, max_depth: int
) -> int:
    # The walk keeps, for each open container, how many of its items are still to come
    # (`left` for the innermost, `stack` for those around it): an item ends every container
    # whose count it completes. Lead bytes are read from `chunk`, a bytes window of the buffer
    # starting at `base`; lengths and counts from `view`, at absolute offsets.
    end = len(view)
    chunk = whole if whole is not None else bytes(view[:CHUNK_BYTES])
    size_of, count_of, sized, counted = _SIZE, _COUNT, _SIZED, _COUNTED
    base = pos = 0
    items = left = 1
    stack: list[int] = []
    while True:
        try:
            while True:
                lead = chunk[pos]
                size = size_of[lead]
                if size:  # the common case: a scalar or short string, its size in its lead byte
                    pos += size
                    left -= 1
                    if left:
                        continue
                else:
                    count = count_of[lead]
                    if count >= 0:
                        pos += 1
                    elif lead in sized:
                        header, read = sized[lead]
                        pos += header + read(view, base + pos + 1)[0]
                        left -= 1
                        if left:
                            continue
                    elif lead in counted:
                        header, read, per_entry = counted[lead]
                        count = read(view, base + pos + 1)[0] * per_entry
                        pos += header
                    else:
                        raise msgspec.DecodeError(
                            f"invalid msgpack byte {lead:#04x} at {base + pos}"
                        )
                    if count >= 0:  # a container
                        if len(stack) >= max_depth:
                            raise DecodeLimitError("depth", max_depth)
                        items += count
                        if items > max_items:
                            raise DecodeLimitError("items", max_items)
                        left -= 1
                        if count:
                            stack.append(left)
                            left = count
                            continue
                while not left:
                    if not stack:
                        return _finished(base + pos, end, items)
                    left = stack.pop()
        except IndexError:
            if whole is not None or base + pos >= end:
                raise
            base += pos
            pos = 0
            chunk = bytes(view[base : base + CHUNK_BYTES])


def _finished(pos: int, end: int, items: int) -> int:
    if pos > end:
        raise msgspec.DecodeError("msgpack data is truncated")
    if pos < end:
        raise msgspec.DecodeError(f"{end - pos} bytes after the msgpack value")
    return items
