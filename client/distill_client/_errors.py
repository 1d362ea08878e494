"""The one exception every failure of the client raises."""

from __future__ import annotations


class DistillError(Exception):
    """A request that did not produce an answer.

    `status` is the HTTP status of the answer (0 when the server could not be
    reached or the connection broke); `str(error)` is the server's own
    message. An `error` event inside a stream keeps the stream's status (200)
    and names the failed `stage`.
    """

    def __init__(self, message: str, status: int = 0, stage: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.stage = stage

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"DistillError(status={self.status}, message={self.message!r})"
