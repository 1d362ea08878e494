"""Keys and values of the shared embedding store, as bytes other processes read.

A key is a digest of the model's identity and the exact text: the text itself
never leaves the process, and a vector made by another model (or another way
of turning text into vectors) is never found. A value carries its own
checksum, bound to its key: bytes damaged on disk or in transit, or filed
under the wrong key, do not decode (a miss), so whatever layer answers, the
response is the same.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .embed import BUNDLED_MODEL, FastEmbedModel, bundled_model_files, file_sha256

# Part of every key: raise it when the way a text becomes its cached entry changes
# (its windows, how their vectors combine, its states), so old entries are not read.
KEY_SCHEME = 1

_MAGIC = b"DXE1"
_HEADER = struct.Struct("<4sBIIIII")  # magic, has states, windows, tokens, dim, state rows, state cols
_CHECKSUM_BYTES = 16
VECTOR_DTYPE, STATES_DTYPE = np.dtype("<f4"), np.dtype("<i2")


class Undecodable(ValueError):
    """Stored bytes that are not a value written for this key."""


class Value(NamedTuple):
    vector: np.ndarray  # (d,) float32
    windows: int
    tokens: int
    states: np.ndarray | None  # (tokens, d) int16


def key(identity: bytes, text: str) -> bytes:
    """32 bytes: SHA-256 of the model identity (itself a fixed-size digest) and the text."""
    return hashlib.sha256(identity + text.encode("utf-8", "surrogatepass")).digest()


def encode(key: bytes, entry: Any) -> bytes:
    """An `Embedded` as bytes: a fixed header, the vector and the states (little-endian),
    then a keyed checksum. Arrays of another dtype or shape are refused (ValueError):
    decoding must give back exactly what the model made."""
    vector, states = entry.vector, entry.states
    if vector.dtype != np.float32 or vector.ndim != 1:
        raise ValueError(f"vector must be (d,) float32, not {vector.shape} {vector.dtype}")
    rows = cols = 0
    if states is not None:
        if states.dtype != np.int16 or states.ndim != 2:
            raise ValueError(f"states must be (tokens, d) int16, not {states.shape} {states.dtype}")
        rows, cols = states.shape
    header = _HEADER.pack(_MAGIC, states is not None, entry.windows, entry.tokens, len(vector), rows, cols)
    parts = [header, vector.astype(VECTOR_DTYPE, copy=False).tobytes()]
    if states is not None:
        parts.append(states.astype(STATES_DTYPE, copy=False).tobytes())
    body = b"".join(parts)
    return body + _checksum(key, body)


def decode(key: bytes, value: bytes) -> Value | None:
    """The entry `encode` wrote for this key, or None for anything else."""
    try:
        return _decode(key, bytes(value))
    except (Undecodable, struct.error, ValueError, TypeError):
        return None


def _decode(key: bytes, value: bytes) -> Value:
    body, checksum = value[:-_CHECKSUM_BYTES], value[-_CHECKSUM_BYTES:]
    if len(value) < _HEADER.size + _CHECKSUM_BYTES or _checksum(key, body) != checksum:
        raise Undecodable("checksum")
    magic, has_states, windows, tokens, dim, rows, cols = _HEADER.unpack_from(body)
    if magic != _MAGIC or has_states not in (0, 1) or (not has_states and (rows or cols)):
        raise Undecodable("header")
    vector_end = _HEADER.size + dim * VECTOR_DTYPE.itemsize
    if len(body) != vector_end + rows * cols * STATES_DTYPE.itemsize:
        raise Undecodable("length")
    vector = np.frombuffer(body, VECTOR_DTYPE, dim, _HEADER.size).astype(np.float32)  # a copy: aligned, writable
    states = None
    if has_states:
        states = np.frombuffer(body, STATES_DTYPE, rows * cols, vector_end).astype(np.int16).reshape(rows, cols)
    return Value(vector, windows, tokens, states)


def _checksum(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_CHECKSUM_BYTES, key=key).digest()


def model_identity(embedder: Any) -> bytes | None:
    """A digest of the model: its name, `KEY_SCHEME` and the SHA-256 of each of its files
    (the model and its tokenizer); None when those files are not known (another kind of
    embedder), so nothing is shared for it. Loads the model first."""
    files = model_files(embedder)
    if not files:
        return None
    digest = hashlib.sha256(f"distill-embedding\0{KEY_SCHEME}\0{embedder.name}\0".encode())
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return digest.digest()


def model_files(embedder: Any) -> list[Path]:
    """The files the embedder's vectors come from: for the bundled model, its packages'
    model and tokenizer; for another fastembed model, every file of its downloaded
    directory; [] for anything else."""
    if not isinstance(embedder, FastEmbedModel):
        return []
    embedder.dim()  # loaded (ModelUnavailable if it cannot be)
    if embedder.name == BUNDLED_MODEL:
        return list(bundled_model_files())
    model_dir = getattr(getattr(getattr(embedder, "_model", None), "model", None), "_model_dir", None)
    if model_dir is None:
        return []
    return sorted(path for path in Path(model_dir).rglob("*") if path.is_file())
