"""Server-Sent Events for the streaming endpoint.

`events` encodes frames (pure); `writer` adds the typed event vocabulary.
"""

from sse.events import comment, encode, encode_json
from sse.writer import Stage, StageTimer, Writer

__all__ = ["Writer", "Stage", "StageTimer", "encode", "encode_json", "comment"]
