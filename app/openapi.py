"""`GET /openapi.json`: the OpenAPI 3.1 document of this API (`app/openapi.json`).

The file is the document; serving it only sets `chunks`' `maxItems` to this
server's DISTILL_MAX_CHUNKS. tests/test_openapi.py keeps it true to the code.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib.resources import files

from flask import Blueprint, Response, current_app

from . import jsonio

openapi = Blueprint("openapi", __name__)


@cache
def document() -> dict:
    """The document as shipped in the package (do not modify: it is shared)."""
    return json.loads(files(__package__).joinpath("openapi.json").read_text(encoding="utf-8"))


def served_document(max_chunks: int) -> dict:
    """The document as a server with this DISTILL_MAX_CHUNKS serves it."""
    doc = copy.deepcopy(document())
    doc["components"]["schemas"]["DedupeRequest"]["properties"]["chunks"]["maxItems"] = max_chunks
    return doc


@openapi.get("/openapi.json")
def openapi_json() -> Response:
    max_chunks = current_app.extensions["distill"].config.max_chunks
    return Response(jsonio.dumps(served_document(max_chunks)), mimetype="application/json")
