"""JSON in and out, fast and exact.

orjson parses and writes a 1,000 x 1,536-vector body many times faster than
the standard library, keeps dict order (Go's struct order on the wire), and
writes floats in shortest form, so a score of 0.9 comes back as 0.9.

Request bodies go through `RequestDecoder` first: simdjson parses them and hands
each chunk's vector over as one float64 array, so the 1.5 million numbers of a
1,000 x 1,536 body never become Python floats (5x faster than orjson, which
must build them). orjson stays the reference: whatever simdjson refuses or could
read differently is parsed by `loads` instead, so values and error messages are
always orjson's.
"""

from __future__ import annotations

import json
import math
import mmap
import re
from typing import Any

import numpy as np
import orjson
import simdjson

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONError(ValueError):
    """The body is not valid JSON (the message says where)."""


def loads(raw: bytes | bytearray | memoryview | mmap.mmap) -> Any:
    """Parse a request body. NaN/Infinity tokens and invalid UTF-8 are errors.

    An escaped lone surrogate ("\\ud800") is valid JSON that orjson refuses;
    as Go does, it becomes U+FFFD.
    """
    if isinstance(raw, mmap.mmap):
        raw = memoryview(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in str(exc):
            raise JSONError(str(exc)) from None
    try:
        text = bytes(raw).decode("utf-8")
        return _replace_surrogates(
            json.loads(
                text, parse_constant=_refuse_constant, parse_float=_float, parse_int=_int
            )
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise JSONError(str(exc)) from None


class RequestDecoder:
    """`loads` for request bodies, with every chunk's `embedding` array of numbers (and
    `query_embedding`) as a float64 array: the same values `loads` gives, as numbers.

    simdjson reads numbers exactly as orjson does (both round correctly) and strings
    the same; where the two could differ, the body is left to `loads`: a byte order
    mark (orjson refuses it), anything simdjson refuses (big integers and lone
    surrogates, which orjson reads; every error, so its message is orjson's), a
    duplicate key (simdjson's lookup finds the first, a dict keeps the last), an
    integer past 2**53 in a vector (numpy would round it to float32 from int64, not
    float64) and a vector holding anything but numbers: a nested array would be
    flattened, so arrays are counted (a body holds one '[' per array, plus those inside
    strings, counted from the strings) and a body with one array too many is left to
    `loads` too.

    One decoder is used by one thread at a time: it keeps simdjson's buffers, sized
    for the biggest body so far, from one body to the next (new ones cost ~3x the parse).
    """

    def __init__(self) -> None:
        self._parser = simdjson.Parser()

    def loads(self, raw: bytes | bytearray | memoryview | mmap.mmap) -> Any:
        if raw[:3] == _BOM:
            return loads(raw)
        try:
            document = self._parser.parse(raw)
        except (ValueError, RuntimeError, KeyError, TypeError):  # simdjson's errors
            return loads(raw)
        try:
            census = _Census()
            value = census.body(document) if isinstance(document, simdjson.Object) else census.plain(document)
        except (_Ambiguous, KeyError):  # KeyError: simdjson cannot look up a key holding \u0000
            return loads(raw)
        finally:
            document = None  # the parser is reusable only once its proxies are gone
        return value if census.no_array_flattened(raw) else loads(raw)


_BOM = b"\xef\xbb\xbf"
_ESCAPED_BRACKET = b"\\u005"  # \u005b or \u005B: a '[' in a string with no '[' byte
_EXACT_INTEGERS = 2.0**53  # every integer up to here is a float64 (and rounds to float32 alike)
_VECTOR_KEYS = ("embedding", "query_embedding")


class _Ambiguous(Exception):
    """simdjson's reading might differ from orjson's here: use `loads`."""


class _Census:
    """Turns simdjson's proxies into Python values, keeping what it needs to count the
    body's arrays afterwards."""

    def __init__(self) -> None:
        self.vectors = 0  # arrays read by `as_buffer`, which flattens nested ones
        self.containers = 0  # arrays converted one element at a time (`chunks`)
        self._plain: list[Any] = []  # every other value that is (or holds) a string or array
        self._keys: list[str] = []

    def no_array_flattened(self, raw: bytes | bytearray | memoryview | mmap.mmap) -> bool:
        """Whether the body holds exactly the arrays read: one '[' each, plus those in strings
        (counted from the strings; an escaped '[' in a string could hide one, so a body with a
        '[' in a string and an escape that may be one is not trusted)."""
        if not self.vectors:
            return True  # nothing was read by `as_buffer`
        in_strings, arrays = "".join(self._keys).count("["), self.vectors + self.containers
        pending = list(self._plain)  # a stack, not recursion: JSON may nest 1,024 deep
        while pending:
            value = pending.pop()
            if isinstance(value, str):
                in_strings += value.count("[")
            elif isinstance(value, list):
                arrays += 1
                pending.extend(value)
            elif isinstance(value, dict):
                in_strings += "".join(value).count("[")
                pending.extend(value.values())
        if in_strings and (raw if hasattr(raw, "find") else bytes(raw)).find(_ESCAPED_BRACKET) >= 0:
            return False
        return count_byte(raw, ord("[")) - in_strings == arrays

    def body(self, document: "simdjson.Object") -> dict:
        """The top-level object; its `chunks` (when an array) one object at a time."""
        out = self._fields(document, lazy=("chunks",))
        chunks = out.get("chunks")
        if isinstance(chunks, simdjson.Array):
            self.containers += 1
            out["chunks"] = [self._fields(c) if isinstance(c, simdjson.Object) else self.plain(c) for c in chunks]
        elif "chunks" in out:
            out["chunks"] = self.plain(chunks)  # (validation refuses it) no proxy outlives the parse
        return out

    def _fields(self, obj: "simdjson.Object", lazy: tuple[str, ...] = ()) -> dict:
        """An object's fields, vectors as arrays (`lazy` ones left as proxies)."""
        keys = list(obj)
        if len(set(keys)) != len(keys):
            raise _Ambiguous  # `obj[key]` would find the first, orjson keeps the last
        self._keys.extend(keys)
        out = {}
        for key in keys:
            value = obj[key]
            if key in lazy:
                out[key] = value
            elif key in _VECTOR_KEYS and isinstance(value, simdjson.Array) and len(value):
                out[key] = self._vector(value)
            else:
                out[key] = self.plain(value)
        return out

    def _vector(self, array: "simdjson.Array") -> Any:
        """A float64 array of the numbers in `array`, or its plain value when it holds
        anything else (validation then refuses it with its usual message)."""
        try:
            vector = np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
        except (ValueError, RuntimeError, TypeError):  # a string, null, bool or object inside
            return self.plain(array)
        if len(vector) != len(array) or np.abs(vector).max() >= _EXACT_INTEGERS:
            raise _Ambiguous  # nested arrays (flattened), or maybe a big integer
        self.vectors += 1
        return vector

    def plain(self, value: Any) -> Any:
        """A proxy as Python values (as orjson gives them: a repeated key keeps its last value)."""
        if isinstance(value, simdjson.Object):
            value = value.as_dict()
        elif isinstance(value, simdjson.Array):
            value = value.as_list()
        if isinstance(value, (str, list, dict)):
            self._plain.append(value)
        return value


def count_byte(raw: bytes | bytearray | memoryview | mmap.mmap, value: int) -> int:
    """How many bytes of `raw` equal `value`: numpy on ~1 MB blocks (`bytes.count` took
    8 ms for 17.5 MB, this ~1 ms, and it reads a mapping in place)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    equal = np.empty(min(len(data), _COUNT_BLOCK), dtype=bool)
    total = 0
    for start in range(0, len(data), _COUNT_BLOCK):
        block = data[start : start + _COUNT_BLOCK]
        total += int(np.count_nonzero(np.equal(block, value, out=equal[: len(block)])))
    return total


_COUNT_BLOCK = 1 << 20


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes, keys in insertion order."""
    return orjson.dumps(obj)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _float(literal: str) -> float:
    """As orjson: a number beyond float64 is an error, not infinity."""
    value = float(literal)
    if math.isinf(value):
        raise ValueError(f"number {literal[:20]} is out of range")
    return value


def _int(literal: str) -> int | float:
    """As orjson: an integer beyond 64 bits becomes a float (or an error beyond float64)."""
    value = int(literal)
    return value if -(2**63) <= value < 2**64 else _float(literal)


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value
