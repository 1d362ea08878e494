"""The page for people: `GET /playground`, and `GET /` when a browser asks for HTML.

Plain files shipped in the package (`app/page/`): one HTML page, a stylesheet
and three JavaScript modules, no build step. The page is a view of the API:
it calls `POST /v1/dedupe/stream` like any client. Its Content-Security-Policy
lets it load and call nothing but this server.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from flask import Blueprint, Response, request

page = Blueprint("page", __name__)

PAGE = "index.html"
ASSETS = {  # file in app/page/ -> (media type, what it is)
    "page.css": ("text/css", "the page's stylesheet"),
    "page.js": ("text/javascript", "the page's script (a JavaScript module)"),
    "request.js": ("text/javascript", "the page's request and curl builder (a JavaScript module)"),
    "stream.js": ("text/javascript", "the page's event-stream reader (a JavaScript module)"),
}
ENDPOINTS = {
    "GET /playground": "a page for people: paste chunks, watch the stages, see what merged and why",
    **{f"GET /playground/{name}": about for name, (_, about) in ASSETS.items()},
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def wants_page() -> bool:
    """A browser: its Accept names text/html and prefers it to JSON (`*/*` alone does not)."""
    accept = request.accept_mimetypes
    names_html = any(value.lower() == "text/html" and quality > 0 for value, quality in accept)
    return names_html and accept.best_match(["application/json", "text/html"]) == "text/html"


def page_response() -> Response:
    return _file_response(PAGE, "text/html")


@page.get("/playground")
def playground() -> Response:
    return page_response()


def _add_asset_route(name: str, mimetype: str) -> None:
    """One fixed route per file (no path parameter: nothing else under /playground/ exists)."""

    def view() -> Response:
        return _file_response(name, mimetype)

    page.add_url_rule(f"/playground/{name}", "asset_" + name.replace(".", "_"), view, methods=["GET"])


for _name, (_mimetype, _) in ASSETS.items():
    _add_asset_route(_name, _mimetype)


@cache
def _read(name: str) -> bytes:
    return files(__package__).joinpath("page", name).read_bytes()


def _file_response(name: str, mimetype: str) -> Response:
    return Response(_read(name), mimetype=mimetype, headers=HEADERS)
