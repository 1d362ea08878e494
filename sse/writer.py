"""Typed SSE layer with the Go service's vocabulary (pkg/sse/sse.go).

Methods return frames instead of writing them, so a Flask generator can
yield them and the writer never touches the network.
"""

import time
from collections.abc import Callable
from typing import Any

from sse.events import comment, encode_json


class Stage:
    """Pipeline stage names as they appear in `progress` and `error` events."""

    EMBEDDING = "embedding"
    CLUSTERING = "clustering"
    SELECTION = "selection"
    MMR = "mmr"


class Writer:
    """Builds the stream's frames; counts them for tests and metrics."""

    def __init__(self) -> None:
        self.frames_written = 0

    def _frame(self, frame: bytes) -> bytes:
        self.frames_written += 1
        return frame

    def progress(self, stage: str, progress: float, stats: dict[str, Any] | None = None) -> bytes:
        """`progress` event; r outside [0, 1] (or NaN) is a caller bug, so it raises."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be within [0, 1], got {progress!r}")
        data: dict[str, Any] = {"stage": stage, "progress": progress}
        if stats is not None:
            data["stats"] = stats
        return self._frame(encode_json("progress", data))

    def complete(self, result: dict[str, Any]) -> bytes:
        """Terminal `complete` event carrying the result exactly as given."""
        return self._frame(encode_json("complete", result))

    def error(self, message: str, stage: str) -> bytes:
        """Terminal `error` event naming the stage that failed."""
        return self._frame(encode_json("error", {"error": message, "stage": stage}))

    def heartbeat(self) -> bytes:
        """`: keep-alive` comment so idle proxies do not cut the connection."""
        return self._frame(comment("keep-alive"))


class StageTimer:
    """Measures a stage's duration for its final stats (`duration_ms`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()

    def restart(self) -> None:
        self._start = self._clock()

    def elapsed_s(self) -> float:
        return self._clock() - self._start

    def elapsed_ms(self) -> int:
        """Whole milliseconds, truncated, as the JSON stats carry integers."""
        return int(self.elapsed_s() * 1000)
