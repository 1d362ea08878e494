"""Run CPU-heavy pipeline steps off the gevent loop, a bounded few at a time.

An embedding batch or a clustering call holds the CPU for up to seconds. Run
inline, it would freeze the worker's event loop: no `/health`, no heartbeat,
no other request. gevent's thread pool runs it on a real thread while the
calling greenlet waits and the loop keeps serving. The pool's size bounds how
many CPU jobs one worker runs at once; the rest wait their turn. It is the
`pipeline.offload.Offload` the runner is given: `all` spreads one step's
embedding batches or clustering blocks over the pool's threads, so a lone
request uses both cores.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence, TypeVar

from gevent.threadpool import ThreadPool

T = TypeVar("T")

CPU_JOBS_PER_WORKER = 2
# The pool's threads yield the cores to the event loop's thread when they are
# short (Linux: niceness is per thread), so /health and heartbeats stay prompt.
POOL_THREAD_NICENESS = 5


class CpuPool:
    """A per-process pool, created on first use (after gunicorn forks)."""

    def __init__(self, size: int = CPU_JOBS_PER_WORKER):
        self.width = size
        self._pool: ThreadPool | None = None
        self._pid = 0

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return self._threads().apply(_below_the_loop, (fn, *args))

    def all(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run the calls on the pool's threads at once; wait for every one (results in order)."""
        pending = [self._threads().spawn(_below_the_loop, call) for call in calls]
        return [result.get() for result in pending]

    def _threads(self) -> ThreadPool:
        if self._pool is None or self._pid != os.getpid():
            self._pool, self._pid = ThreadPool(self.width), os.getpid()
        return self._pool


def _below_the_loop(fn: Callable[..., T], *args: Any) -> T:
    if sys.platform == "linux":  # elsewhere it would lower the whole process
        os.setpriority(os.PRIO_PROCESS, 0, POOL_THREAD_NICENESS)  # 0: this thread
    return fn(*args)
