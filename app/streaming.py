"""The stage runner as a Server-Sent Events stream.

The runner works in its own greenlet and hands each event over a channel; the
response generator waits on that channel with a timeout, so while a stage
computes (on the CPU pool) it can still send `: keep-alive` comments.

A channel has no buffer: the runner cannot start its next step until the
response has taken (and the server written) the previous event. When the
client has gone, that write fails, the server closes this generator, and the
runner greenlet is killed: no further step or stage runs for it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import gevent
from gevent.queue import Channel, Empty

from pipeline.types import Result, StageError, StageEvent
from sse import Writer

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error"
SHUTTING_DOWN = "server shutting down before the stream could finish"


def sse_frames(
    events: Iterator[StageEvent | Result],
    heartbeat_s: float,
    on_end: Callable[[Result | StageError | None], None] = lambda outcome: None,
) -> Iterator[bytes]:
    """SSE frames for one run: progress events, then exactly one `complete` or `error`.

    `on_end` learns the outcome: the result, the error, or None when the
    client left first. When the server is draining and the stream cannot
    finish before the deadline, it ends with an `error` event in time.
    """
    writer = Writer()
    channel: Channel = Channel()
    producer = gevent.spawn(_produce, events, channel)
    outcome: Result | StageError | None = None
    stage = ""
    try:
        while True:
            if draining.past_deadline():
                outcome = ShuttingDown(stage, SHUTTING_DOWN)
                yield writer.error(outcome.message, outcome.stage)
                return
            try:
                item = channel.get(timeout=_wait_limit(heartbeat_s))
            except Empty:
                if not draining.past_deadline():
                    yield writer.heartbeat()
                continue
            if isinstance(item, StageEvent):
                stage = item.stage
                yield writer.progress(item.stage, item.progress, item.stats)
            elif isinstance(item, Result):
                outcome = item
                yield writer.complete(item.to_wire())
                return
            else:
                outcome = item
                yield writer.error(item.message, item.stage)
                return
    finally:
        producer.kill()  # waits until it is gone: its current step cannot start another
        on_end(outcome)


class ShuttingDown(StageError):
    """The server stopped before this stream could finish."""


class Draining:
    """Graceful shutdown: a deadline by which every open stream must have ended.

    gunicorn force-closes connections when its graceful timeout runs out; a
    stream still computing then gets an `error` event first, never a cut.
    """

    def __init__(self) -> None:
        self.deadline: float | None = None

    def start(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def started(self) -> bool:
        return self.deadline is not None

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def past_deadline(self) -> bool:
        left = self.seconds_left()
        return left is not None and left <= 0


draining = Draining()


def _wait_limit(heartbeat_s: float) -> float:
    left = draining.seconds_left()
    return heartbeat_s if left is None else max(0.0, min(heartbeat_s, left))


def _produce(events: Iterator[StageEvent | Result], channel: Channel) -> None:
    """Feed the runner's items into `channel`; a failure becomes a `StageError` item."""
    stage = ""
    try:
        for item in events:
            if isinstance(item, StageEvent):
                stage = item.stage
            channel.put(item)
    except StageError as exc:
        log.error("stream failed in stage %s: %s", exc.stage, exc.message, exc_info=exc.__cause__)
        channel.put(exc)
    except Exception:
        log.exception("stream failed in stage %s", stage or "start")
        channel.put(StageError(stage, INTERNAL_ERROR))
    finally:
        events.close()
