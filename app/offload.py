"""Run CPU-heavy pipeline steps off the gevent loop, a bounded few at a time.

An embedding batch or a clustering call holds the CPU for up to seconds. Run
inline, it would freeze the worker's event loop: no `/health`, no heartbeat,
no other request. gevent's thread pool runs it on a real thread while the
calling greenlet waits and the loop keeps serving. The pool's size bounds how
many CPU jobs one worker runs at once; the rest wait their turn.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from gevent.threadpool import ThreadPool

CPU_JOBS_PER_WORKER = 2


class CpuPool:
    """A per-process pool, created on first use (after gunicorn forks)."""

    def __init__(self, size: int = CPU_JOBS_PER_WORKER):
        self.size = size
        self._pool: ThreadPool | None = None
        self._pid = 0

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._pool is None or self._pid != os.getpid():
            self._pool, self._pid = ThreadPool(self.size), os.getpid()
        return self._pool.apply(fn, args)
