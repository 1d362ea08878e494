"""Offloads run independent calls at once, on real threads, and give results in order.

Two calls that each wait at a two-party barrier can only both finish if they
run at the same time; one after the other, the first would break the barrier.
"""

from __future__ import annotations

import threading

import pytest

from app.offload import CpuPool
from pipeline.offload import INLINE, Threads


@pytest.fixture(params=["threads", "gevent pool"])
def offload(request):
    return Threads(2) if request.param == "threads" else CpuPool(2)


def test_all_runs_calls_at_the_same_time(offload):
    barrier = threading.Barrier(2, timeout=60)
    names = offload.all([lambda: (barrier.wait(), threading.get_ident())[1]] * 2)
    assert len(set(names)) == 2 and threading.get_ident() not in names


def test_all_keeps_the_order_of_the_calls(offload):
    assert offload.all([lambda k=k: k * k for k in range(7)]) == [k * k for k in range(7)]
    assert offload(divmod, 17, 5) == (3, 2)


def test_a_failing_call_raises_in_the_caller(offload):
    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        offload.all([lambda: 1, fail])
    assert offload.all([lambda: 2]) == [2]  # the pool still works


def test_inline_runs_in_the_caller_one_at_a_time():
    assert INLINE.width == 1
    assert INLINE.all([threading.get_ident, threading.get_ident]) == [threading.get_ident()] * 2
