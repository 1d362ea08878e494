"""Server-Sent Events encoding: one event in, one bytes frame out.

Kept pure (no I/O, no pipeline types) so framing rules can be tested without a
server, and so the HTTP layer only ever yields complete frames.
"""

import math
import re

import orjson

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _one_line(text: str) -> str:
    """Drop CR/LF so a name or comment cannot end its line early and inject fields."""
    return text.replace("\r", "").replace("\n", "")


def encode(event: str | None, data: str) -> bytes:
    """Frame `data` as one SSE event; each input line becomes its own `data:` line.

    SSE treats CR, LF and CRLF all as line ends, so multi-line data must be split
    on all three or a client would read a stray line as a new field.
    """
    head = "" if event is None else f"event: {_one_line(event)}\n"
    body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return f"{head}{body}\n".encode()


def _check_finite(obj: object) -> None:
    """Raise ValueError on NaN/Infinity anywhere in obj: orjson would write null silently."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite float in SSE payload: {obj!r}")
    elif isinstance(obj, dict):
        for value in obj.values():
            _check_finite(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_finite(value)


def encode_json(event: str, obj: object) -> bytes:
    """Frame obj as compact one-line JSON (orjson escapes newlines inside strings)."""
    _check_finite(obj)
    return encode(event, orjson.dumps(obj).decode())


def comment(text: str = "") -> bytes:
    """A comment frame, ignored by clients; sent as a heartbeat to keep proxies open."""
    return f": {_one_line(text)}\n\n".encode()
