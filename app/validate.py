"""Turn a parsed JSON body into a `DedupeRequest`, or refuse it with a clear 4xx.

Every rule of the contract is checked here, once, so the pipeline can trust
its input. Go-client zero values (threshold 0, lambda 0, null text, empty
embedding) mean "default", as in the Go service; unlike it, out-of-range
values are refused instead of silently replaced.
"""

from __future__ import annotations

import base64
import binascii
import math
import sys
from typing import Any, Callable

import numpy as np
import pybase64

from pipeline.cache import EmbeddingCache, tokens_to_embed
from pipeline.embed import Embedder, ModelUnavailable
from pipeline.types import GUARDS, LINKAGES, SELECTIONS, Chunk, DedupeRequest, checked_chunk

from .config import Config

_NUMBER_TYPES = {int, float}


class ApiError(Exception):
    """An HTTP error answered as JSON `{"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> ApiError:
    return ApiError(400, message)


def parse_request(body: Any, config: Config, allocate: Callable[..., np.ndarray] = np.empty) -> DedupeRequest:
    """Validate a parsed body against the contract (limits from `config`). When every chunk
    brought a vector of one dimension, they are also gathered into one matrix (`vectors`),
    made by `allocate(shape, dtype)` (the body parser process makes it where the worker can
    map it)."""
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    raw_chunks = body.get("chunks")
    if raw_chunks is None or raw_chunks == []:
        raise bad("chunks is required and must not be empty")
    if not isinstance(raw_chunks, list):
        raise bad("chunks must be an array")
    if len(raw_chunks) > config.max_chunks:
        raise ApiError(
            413, f"too many chunks: {len(raw_chunks)} > DISTILL_MAX_CHUNKS ({config.max_chunks})"
        )
    with np.errstate(over="ignore"):  # a number too big for float32 -> inf -> refused (once, not per vector)
        rows = _decoded_rows(raw_chunks, allocate)
        if rows is None:
            chunks = tuple(_chunk(raw, i) for i, raw in enumerate(raw_chunks))
        else:
            chunks = tuple(_chunk(raw, i, row) for i, (raw, row) in enumerate(zip(raw_chunks, rows)))
        markers = [_cache_marker(raw.get("cache_control"), i) for i, raw in enumerate(raw_chunks)]
        frozen_count = _frozen_count(markers) if _preserve_cache_prefix(body.get("options")) else 0
        query_embedding = _embedding(body.get("query_embedding"), "query_embedding")
    _check_dimensions(chunks[frozen_count:], query_embedding)
    return DedupeRequest(
        vectors=rows if rows is not None else _gathered(chunks, allocate),
        chunks=chunks,
        threshold=_zero_is_default(body, "threshold", 2.0),
        lambda_=_zero_is_default(body, "lambda", 1.0),
        target_k=_target_k(body.get("target_k")),
        guards=_guards(body.get("guards")),
        linkage=_choice(body, "linkage", LINKAGES),
        selection=_choice(body, "selection", SELECTIONS),
        query=_optional_string(body.get("query"), "query") or None,
        query_embedding=query_embedding,
        frozen_count=frozen_count,
        explain=_flag(body.get("explain"), "explain"),
    )


def check_model_dimension(request: DedupeRequest, model_dim: int) -> None:
    """Given vectors must match the model's when the model embeds the rest."""
    suffix = request.chunks[request.frozen_count :]  # a frozen chunk's vector is never used
    given = next((c.embedding for c in suffix if c.embedding is not None), None)
    if given is None:
        given = request.query_embedding
    if given is not None and len(given) != model_dim:
        raise bad(
            f"embedding dimension {len(given)} does not match the model's dimension {model_dim}"
        )


def check_against_model(
    request: DedupeRequest, embedder: Embedder, cache: EmbeddingCache | None, config: Config
) -> None:
    """The checks that need the model, before any work: it must load (else 503); given
    vectors must match its dimension (400); the texts to embed must hold at most
    DISTILL_MAX_TOKENS tokens (413). Blocking (it may load the model and tokenize):
    front ends call it off their event loop."""
    if not request.needs_model:
        return
    try:
        model_dim = embedder.dim()
    except ModelUnavailable as exc:
        raise ApiError(503, f"embedding model unavailable: {exc}") from None
    if request.model_embeds:
        check_model_dimension(request, model_dim)
        tokens = tokens_to_embed(request.unique_texts_to_embed, embedder, cache)
        if tokens > config.max_tokens:
            raise ApiError(
                413, f"too many tokens to embed: {tokens} > DISTILL_MAX_TOKENS ({config.max_tokens})"
            )


def _chunk(raw: Any, index: int, decoded: np.ndarray | None = None) -> Chunk:
    """One chunk. The common cases (a string or null, a vector decoded as an array, an int or
    float score) are checked inline; anything else takes the general checks, with the same
    messages (at 10,000 chunks the messages' places, formatted up front, cost ~10 ms).
    `decoded`: its vector, already decoded and checked (`_array_rows`, `_base64_rows`)."""
    if not isinstance(raw, dict):
        raise bad(f"chunks[{index}] must be an object")
    text = raw.get("text")
    if text is None:
        text = ""
    elif type(text) is not str:
        text = _optional_string(text, f"chunks[{index}].text") or ""
    value = raw.get("embedding")
    if decoded is not None:
        embedding = decoded
    elif type(value) is np.ndarray:
        embedding = value.astype(np.float32)  # too big for float32 -> inf -> refused
        if not np.isfinite(embedding).all():
            raise bad(f"chunks[{index}].embedding must contain finite float32 numbers")
    else:
        embedding = _base64_vector(value) if type(value) is str else None
        if embedding is None:
            embedding = _embedding(value, f"chunks[{index}].embedding")
    if not text and embedding is None:
        raise bad(f"chunks[{index}] needs a non-empty text or an embedding")
    id_ = raw.get("id")
    if type(id_) is not str:
        id_ = _optional_string(id_, f"chunks[{index}].id") or ""
    score = raw.get("score")
    if not (type(score) is float and math.isfinite(score) or type(score) is int and -(2**63) <= score < 2**63):
        score = _score(score, f"chunks[{index}].score")
    return checked_chunk(id_, text, score, embedding)


def _preserve_cache_prefix(options: Any) -> bool:
    """`options.preserve_cache_prefix`; null or absent (as `options` itself) is false."""
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("options must be an object")
    value = options.get("preserve_cache_prefix")
    if value is None or isinstance(value, bool):
        return bool(value)
    raise bad("options.preserve_cache_prefix must be a boolean")


def _cache_marker(value: Any, index: int) -> bool:
    """Whether `cache_control` marks a cache boundary, as Go Distill reads it: a non-empty
    string or object (Anthropic's `{"type": "ephemeral"}`) or true; "", {}, false, null not."""
    if value is None or isinstance(value, (bool, str, dict)):
        return bool(value)
    raise bad(f"chunks[{index}].cache_control must be a string, an object or a boolean")


def _frozen_count(markers: list[bool]) -> int:
    """Every chunk up to and including the last marked one is frozen."""
    return max((i + 1 for i, marked in enumerate(markers) if marked), default=0)


def _optional_string(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise bad(f"{where} must be a string")


def _is_finite_number(value: Any) -> bool:
    """A JSON number a float64 can hold, as Go's decoder requires (bool is not a number)."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -sys.float_info.max <= value <= sys.float_info.max


def _score(value: Any, where: str) -> int | float:
    if value is None:
        return 0
    if not _is_finite_number(value):
        raise bad(f"{where} must be a finite number")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return float(value)  # as Go's float64; the encoder cannot write a bigger int
    return value


def _embedding(value: Any, where: str) -> np.ndarray | None:
    """A list of finite numbers or a base64 string of little-endian float32; empty = absent.
    (`jsonio.RequestDecoder` hands a list of numbers over as a float64 array.)"""
    if isinstance(value, np.ndarray):
        vector = value.astype(np.float32)  # too big for float32 -> inf -> refused below
    elif value is None or value == [] or value == "":
        return None
    elif isinstance(value, str):
        vector = _from_base64(value, where)
    elif isinstance(value, list):
        vector = _numbers(value, where).astype(np.float32)
    else:
        raise bad(f"{where} must be an array of numbers or a base64 string")
    if not np.isfinite(vector).all():
        raise bad(f"{where} must contain finite float32 numbers")
    return vector


def _numbers(value: list, where: str) -> np.ndarray:
    """A JSON array of numbers as a 1-D float or int array.

    numpy reads a plain array of numbers in one pass (a type check per element
    in Python cost as much again). It reads true/false as 1/0, so a bool can
    only hide where the array is 0 or 1: only those places are looked at.
    Anything else unusual (strings, nulls, nesting, integers beyond 64 bits)
    takes the exact path: a type check per element.
    """
    try:
        array = np.array(value)
    except ValueError:  # ragged nesting
        array = None
    if array is not None and array.ndim == 1 and array.dtype.kind in "fi":
        maybe_bool = np.flatnonzero((array == 0) | (array == 1))
        if not any(type(value[i]) is bool for i in maybe_bool):
            return array
    if not set(map(type, value)) <= _NUMBER_TYPES:
        raise bad(f"{where} must be an array of numbers")
    try:
        return np.array(value, dtype=np.float64)
    except OverflowError:
        raise bad(f"{where} must contain finite numbers") from None


def _from_base64(value: str, where: str) -> np.ndarray:
    """The float32 values (a read-only view of the decoded bytes: no copy).

    pybase64 decodes 20x faster than the standard library and accepts no string
    the standard library refuses; what it refuses takes the standard path, so the
    error messages stay the same."""
    try:
        raw = pybase64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raw = _b64decode_exact(value, where)
    if len(value) != 4 * -(-len(raw) // 3):  # b64decode ignores '=' after full groups
        raise bad(f"{where} is not valid base64 (extra padding)")
    if len(raw) % 4:
        raise bad(f"{where} must decode to whole float32 values ({len(raw)} bytes)")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)  # a copy only if big-endian


def _decoded_rows(raw_chunks: list, allocate: Callable[..., np.ndarray]) -> np.ndarray | None:
    """The request's matrix of vectors when one of the fast paths below reads every chunk's
    at once, else None (each chunk is then checked on its own)."""
    try:
        values = [raw["embedding"] for raw in raw_chunks]
    except (TypeError, KeyError):  # a chunk that is not an object, or has no embedding
        return None
    rows = _array_rows(values, allocate)
    return rows if rows is not None else _base64_rows(values, allocate)


def _array_rows(values: list, allocate: Callable[..., np.ndarray]) -> np.ndarray | None:
    """Every chunk's vector (`values`: their embeddings), when the decoder made each an
    array of one length, cast to float32 in one pass into the request's matrix (made by
    `allocate`) and checked finite at once: what each one's own cast gives. Else None:
    each is checked on its own, for its message."""
    first = values[0]
    if type(first) is not np.ndarray or first.ndim != 1 or not len(first):
        return None
    size = len(first)
    if not all(type(value) is np.ndarray and value.shape == (size,) for value in values):
        return None
    rows = np.stack(values, out=allocate((len(values), size), dtype=np.float32), casting="same_kind")
    return rows if np.isfinite(rows).all() else None


def _base64_rows(values: list, allocate: Callable[..., np.ndarray]) -> np.ndarray | None:
    """Every chunk's base64 vector (`values`: their embeddings) decoded at once, as the rows
    of the request's (n, d) float32 matrix (made by `allocate`), when each is a base64
    string of the same length, with no padding, every value finite: what decoding each one
    gives (their groups of 4 characters decode alike, joined or apart), in one call (1,000 x
    1,536: ~8 ms of per-chunk decoding and checks -> ~3 ms). Else None: each is decoded on
    its own."""
    first = values[0]
    if type(first) is not str or not first or len(first) % 4 or first[-1] == "=":
        return None
    size = len(first)
    if not all(type(value) is str and len(value) == size and value[-1] != "=" for value in values):
        return None
    try:
        raw = pybase64.b64decode("".join(values), validate=True)
    except (binascii.Error, ValueError, TypeError):
        return None
    width = size // 4 * 3
    if len(raw) != width * len(values) or width % 4:
        return None
    rows = np.frombuffer(raw, dtype="<f4").reshape(len(values), width // 4)
    if not np.isfinite(rows).all():
        return None
    matrix = allocate(rows.shape, dtype=np.float32)
    np.copyto(matrix, rows)  # (byte order swapped only on a big-endian machine)
    return matrix


def _base64_vector(value: str) -> np.ndarray | None:
    """`_from_base64`'s vector when all is well (valid, whole float32s, all finite), else None:
    the general path then decides, with its messages."""
    try:
        raw = pybase64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return None
    if not raw or len(value) != 4 * -(-len(raw) // 3) or len(raw) % 4:
        return None
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    return vector if np.isfinite(vector).all() else None


def _b64decode_exact(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where} is not valid base64") from None


def _check_dimensions(chunks: tuple[Chunk, ...], query_embedding: np.ndarray | None) -> None:
    dims = {len(c.embedding) for c in chunks if c.embedding is not None}
    if query_embedding is not None:
        dims.add(len(query_embedding))
    if len(dims) > 1:
        raise bad(f"all embeddings must have the same dimension, got {sorted(dims)}")


def _gathered(chunks: tuple[Chunk, ...], allocate: Callable[..., np.ndarray]) -> np.ndarray | None:
    """(n, d) float32, row i the vector of chunk i, when every chunk has one of one dimension
    (checked chunk by chunk: no fast path gathered them)."""
    first = chunks[0].embedding
    if first is None or any(c.embedding is None or len(c.embedding) != len(first) for c in chunks):
        return None
    return np.stack([c.embedding for c in chunks], out=allocate((len(chunks), len(first)), dtype=np.float32))


def _zero_is_default(body: dict, name: str, high: float) -> float | None:
    """A Go client sends 0 for "unset": 0, null or missing mean the default."""
    value = body.get(name)
    if value is None:
        return None
    if not _is_finite_number(value):
        raise bad(f"{name} must be a finite number")
    if value < 0 or value > high:
        raise bad(f"{name} must be between 0 and {high:g}, got {value}")
    return None if value == 0 else float(value)


def _target_k(value: Any) -> int:
    if value is None:
        return 0
    if type(value) is not int:
        raise bad("target_k must be an integer")
    if value < 0:
        raise bad(f"target_k must be >= 0, got {value}")
    return value


def _flag(value: Any, name: str) -> bool:
    """An optional JSON boolean (null means false); 1 or "true" is refused, not guessed."""
    if value is None:
        return False
    if type(value) is not bool:
        raise bad(f"{name} must be true or false")
    return value


def _guards(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise bad("guards must be an array of strings")
    unknown = sorted(set(value) - set(GUARDS))
    if unknown:
        raise bad(f"unknown guard {unknown[0]!r}; known: {', '.join(GUARDS)}")
    return tuple(dict.fromkeys(value))


def _choice(body: dict, name: str, allowed: tuple[str, ...]) -> str:
    value = body.get(name)
    if value is None:
        return allowed[0]
    if value not in allowed:
        raise bad(f"{name} must be one of {', '.join(allowed)}")
    return value
