"""Where the runner's CPU-heavy steps run.

`Offload` is what the runner and `Clustering` are given: call one function, or
run several independent ones at once (`all`, up to `width` in parallel). numpy's
BLAS products release the GIL, so two threads with one BLAS thread each use both
cores for the large-n tiles, without the stalls that a multi-threaded BLAS
showed on small products here. `Inline` runs everything in the caller;
`Threads` on a thread pool (for in-process use; a gevent server passes its own
pool, since gevent turns `threading` threads into greenlets).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence, TypeVar

T = TypeVar("T")


class Offload(Protocol):
    width: int  # how many calls `all` runs at the same time

    def __call__(self, fn: Callable[..., T], *args: Any) -> T: ...

    def all(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run independent calls, up to `width` at once; their results in order."""
        ...


class Inline:
    """Everything in the calling thread, one call after another."""

    width = 1

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def all(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        return [call() for call in calls]


class Threads:
    """A pool of `width` threads; each call runs on one of them."""

    def __init__(self, width: int = 2):
        self.width = width
        self._pool = ThreadPoolExecutor(width, thread_name_prefix="distill-cpu")

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, *args).result()

    def all(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        futures = [self._pool.submit(call) for call in calls]
        return [future.result() for future in futures]

    def close(self) -> None:
        self._pool.shutdown()


INLINE = Inline()
