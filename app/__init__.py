"""Distill's HTTP service: `create_app()` builds it from a `Config`.

Configuration is resolved once (from the environment unless a `Config` is
given); the embedding model loads lazily, once per process, on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from flask import Flask, Response, request

from pipeline.cache import EmbeddingCache
from pipeline.embed import BUNDLED_MODEL, Embedder, FastEmbedModel
from pipeline.offload import Offload
from pipeline.runner import Defaults

from .api import api
from .openapi import openapi
from .page import page
from .auth import check_api_key
from .config import Config, embedding_cache, load_config, request_defaults
from .errors import register_error_handlers
from .intake import BODY_READ, TICKET, Intake, discard_rest
from .metrics import CACHE_METRICS, init_metrics
from .offload import CpuPool
from .parsing import BodyParser
from .tracing import init_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__version__ = "0.1.0"

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
}


@dataclass
class Service:
    """What the routes share: config, the model, the CPU pool, request defaults,
    this worker's intake bound and body parser."""

    config: Config
    embedder: Embedder
    offload: Offload
    defaults: Defaults
    cache: EmbeddingCache
    intake: Intake
    parser: BodyParser

    @property
    def heartbeat_s(self) -> float:
        return self.config.sse_heartbeat_s


def create_app(
    config: Config | None = None,
    embedder: Embedder | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Flask:
    config = load_config() if config is None else config
    app = Flask(__name__, static_folder=None)  # an API: no /static route
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False  # Go's struct order, never alphabetical
    embedder = embedder or FastEmbedModel(config.embedding_model)
    app.extensions["distill"] = Service(
        config=config,
        embedder=embedder,
        offload=CpuPool(),
        defaults=request_defaults(config),
        cache=embedding_cache(config, embedder, CACHE_METRICS),
        intake=Intake(config.max_inflight_bytes),
        parser=BodyParser(config),
    )
    register_error_handlers(app)
    init_metrics(app)  # first, so its timer also sees requests refused by auth
    init_tracing(app, tracer_provider)  # off unless OTEL_* (or a test's provider) asks
    _register_cors_and_auth(app, config)
    _register_intake(app, config)
    app.register_blueprint(api)
    app.register_blueprint(openapi)
    app.register_blueprint(page)
    return app


def _register_cors_and_auth(app: Flask, config: Config) -> None:
    @app.before_request
    def preflight_and_auth():
        if request.method == "OPTIONS":  # any path: a browser's preflight
            return Response(status=200, headers=CORS_HEADERS)
        if config.api_keys and request.path.startswith("/v1/"):
            check_api_key(request.headers.get("Authorization"), config.api_keys)
        return None

    @app.after_request
    def allow_any_origin(response: Response) -> Response:
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response


def _register_intake(app: Flask, config: Config) -> None:
    @app.after_request
    def finish_intake(response: Response) -> Response:
        """A request's body bytes count against its worker until the response is sent
        (a stream: until it ends or the client leaves); a body not read (refused,
        or sent where none is read) is dropped after the response."""
        environ = request.environ
        ticket = environ.get(TICKET)
        if ticket is not None:
            if response.is_streamed:
                response.call_on_close(ticket.release)
            else:
                ticket.release()
        if not environ.get(BODY_READ):
            response.call_on_close(partial(discard_rest, environ, config.max_body_bytes))
        return response


__all__ = ["create_app", "Config", "load_config", "BUNDLED_MODEL"]
