"""Every error is JSON `{"error": message}`; no traceback ever reaches a client."""

from __future__ import annotations

import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from . import jsonio
from .intake import Unavailable
from .validate import ApiError

log = logging.getLogger(__name__)

_MESSAGES = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
}


def error_response(status: int, message: str) -> Response:
    return Response(jsonio.dumps({"error": message}), status=status, mimetype="application/json")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        response = error_response(exc.status, exc.message)
        if isinstance(exc, Unavailable):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        response = error_response(status, _MESSAGES.get(status, exc.name.lower()))
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal error")
