"""`distill-mcp`: de-duplication as tools an agent calls over the Model Context Protocol.

The same stage runner as the HTTP API, in process: same configuration, same
defaults, same model, same validation (so a bad argument gets the very message
`/v1/dedupe` gives, as a tool error). Tools and argument names follow the Go
service's `distill mcp`: `deduplicate_chunks` and `analyze_redundancy`.

stdio by default (an agent starts it as a subprocess); `--transport http`
serves streamable HTTP at `/mcp`, behind `DISTILL_API_KEYS` when set.

The server's event loop never computes: validation and every runner step run
on a worker thread while the loop keeps answering other calls. Stage events go
out as progress notifications when the caller gave a progress token; a
cancelled call closes the runner between two steps, as a disconnect does on
the SSE endpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any, Awaitable, Callable, Iterator

import anyio
import mcp_types as types
import numpy as np
import uvicorn
from mcp.server import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline.cluster import members
from pipeline.embed import Embedder, FastEmbedModel, ModelUnavailable
from pipeline.offload import Offload, Threads
from pipeline.runner import CLUSTERING, EMBEDDING, MMR, SELECTION, run
from pipeline.types import DedupeRequest, Result, StageError, StageEvent

from . import __version__, jsonio
from .auth import check_api_key
from .config import Config, ConfigError, embedding_cache, load_config, request_defaults
from .validate import ApiError, check_against_model, parse_request

log = logging.getLogger("distill.mcp")

DEDUPLICATE = "deduplicate_chunks"
ANALYZE = "analyze_redundancy"
STAGES = (EMBEDDING, CLUSTERING, SELECTION, MMR)  # progress: stage i runs from i to i + 1

Progress = Callable[[float, float | None, str | None], Awaitable[None]]


class DistillTools:
    """The two tools over one model, one CPU pool and one embedding cache."""

    def __init__(self, config: Config, embedder: Embedder | None = None, offload: Offload | None = None):
        self.config = config
        self.embedder = embedder or FastEmbedModel(config.embedding_model)
        self.offload = offload or Threads()
        self.defaults = request_defaults(config)
        self.cache = embedding_cache(config, self.embedder)

    def warm_up(self) -> None:
        """Load the model now, so the first call does not wait for it (a failure is the calls' to report)."""
        try:
            self.embedder.dim()
        except ModelUnavailable:
            pass

    async def deduplicate(self, arguments: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """The `/v1/dedupe` object, plus the threshold and lambda the run used."""
        started = time.perf_counter()
        request = await self._validated(arguments)
        result, threshold = await self._run(request, started, progress)
        wire = result.to_wire()
        wire["stats"]["threshold_used"] = threshold
        wire["stats"]["lambda_used"] = (
            self.defaults.lambda_ if request.lambda_ is None else request.lambda_
        )
        return wire

    async def analyze(self, arguments: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Every cluster (duplicates and singletons) and what to do about them; nothing removed."""
        started = time.perf_counter()
        fields = {name: arguments.get(name) for name in ANALYZE_FIELDS}
        request = await self._validated(fields)
        result, threshold = await self._run(request, started, progress)
        clusters = [
            {
                "cluster_id": cluster_id,
                "size": len(indices),
                "member_ids": [request.chunks[i].id for i in indices.tolist()],
                "member_indices": indices.tolist(),
                "is_redundant": len(indices) > 1,
            }
            for cluster_id, indices in enumerate(members(np.asarray(result.labels)))
        ]
        total = result.input_count
        redundant = total - result.cluster_count
        return {
            "summary": {
                "total_chunks": total,
                "redundant_chunks": redundant,
                "redundancy_pct": round(100 * redundant / total, 1),
                "cluster_count": result.cluster_count,
                "threshold_used": threshold,
            },
            "clusters": clusters,
            "recommendation": recommendation(total, result.cluster_count, threshold),
        }

    async def _validated(self, body: dict[str, Any]) -> DedupeRequest:
        """The HTTP API's validation, off the event loop (big vectors take a while to check)."""
        request = await anyio.to_thread.run_sync(parse_request, body, self.config)
        await anyio.to_thread.run_sync(check_against_model, request, self.embedder, self.cache, self.config)
        return request

    async def _run(
        self, request: DedupeRequest, started: float, progress: Progress
    ) -> tuple[Result, float]:
        """Drive the runner one step at a time on a worker thread; report each stage event.

        Cancelling the call waits for the current step, then closes the
        runner: no further batch or stage runs. Returns the result and the
        threshold the clustering stage used.
        """
        events = run(
            request, self.embedder, self.defaults, self.offload, started=started, cache=self.cache
        )
        reporter = StageProgress(progress)
        threshold = 0.0
        try:
            while True:
                item = await anyio.to_thread.run_sync(_next, events)
                if isinstance(item, Result):
                    return item, threshold
                if item.stage == CLUSTERING and item.stats:
                    threshold = item.stats["threshold"]
                await reporter(item)
        except StageError as exc:
            if isinstance(exc.__cause__, ModelUnavailable):
                raise ApiError(503, exc.message) from exc
            log.error("tool call failed in %s", exc.stage, exc_info=exc.__cause__)
            raise ApiError(500, f"internal error in stage {exc.stage}") from exc
        except anyio.get_cancelled_exc_class():
            log.info("call cancelled during the %s stage; runner closed", reporter.stage or "first")
            raise
        finally:
            events.close()


ANALYZE_FIELDS = ("chunks", "threshold", "guards", "linkage")


def _next(events: Iterator[StageEvent | Result]) -> StageEvent | Result:
    """One runner step (a StopIteration cannot cross back from a worker thread)."""
    item = next(events, None)
    if item is None:
        raise StageError("", "the runner ended without a result")
    return item


class StageProgress:
    """Stage events as MCP progress: `i + r` out of 4 for stage i at fraction r.

    MCP progress must grow with every notification, so a stage's start, which
    has the value its predecessor ended on, is not sent again. The message is
    the event as the SSE endpoint writes it: `{"stage", "progress", "stats"?}`.
    """

    def __init__(self, progress: Progress):
        self.progress = progress
        self.sent = -1.0
        self.stage = ""

    async def __call__(self, event: StageEvent) -> None:
        self.stage = event.stage
        value = STAGES.index(event.stage) + event.progress
        if value <= self.sent:
            return
        self.sent = value
        data: dict[str, Any] = {"stage": event.stage, "progress": event.progress}
        if event.stats is not None:
            data["stats"] = event.stats
        await self.progress(value, len(STAGES), jsonio.dumps(data).decode())


def recommendation(total: int, clusters: int, threshold: float) -> str:
    """One line an agent can act on."""
    redundant = total - clusters
    if redundant == 0:
        return (
            f"No redundancy: all {total} chunks are distinct at threshold {threshold:g}; "
            "use them as they are."
        )
    return (
        f"{redundant} of {total} chunks ({100 * redundant / total:.1f}%) repeat others at "
        f"threshold {threshold:g}: call {DEDUPLICATE} to keep {clusters} "
        f"(one per cluster)."
    )


# --- tool definitions -----------------------------------------------------------------

_CHUNKS = {
    "type": "array",
    "minItems": 1,
    "description": (
        "The chunks to de-duplicate, e.g. retrieval results, tool output or memories. "
        "Each needs a non-empty 'text' or an 'embedding'; chunks without an embedding "
        "are embedded by the server's local model."
    ),
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "Your id for the chunk; echoed back."},
            "text": {"type": "string", "description": "The chunk's text."},
            "score": {
                "type": "number",
                "description": "Retrieval relevance, higher is better (default 0); the "
                "best-scored chunk of a cluster is kept (with the coverage guard on: the "
                "best-scored of those that say everything the others say).",
            },
            "embedding": {
                "type": ["array", "string"],
                "items": {"type": "number"},
                "description": "Optional precomputed vector: numbers, or base64 of "
                "little-endian float32. All given vectors must share one dimension.",
            },
            "cache_control": {
                "description": "Prompt-cache marker (e.g. {\"type\": \"ephemeral\"}); "
                "used with options.preserve_cache_prefix.",
            },
        },
    },
}
_THRESHOLD = {
    "type": "number",
    "minimum": 0,
    "maximum": 2,
    "description": (
        "Largest cosine distance at which two chunks count as duplicates; lower is "
        "stricter. Omit (or 0) for the default: 0.15 when every chunk brings its own "
        "embedding, the local model's calibrated value when the server embeds."
    ),
}
_GUARDS = {
    "type": "array",
    "items": {"type": "string", "enum": ["numbers"]},
    "description": (
        "Guards that keep chunks apart whatever their vectors say: 'numbers' separates "
        "texts that state different numbers ('rose 3%' vs 'rose 5%'). Default: ['numbers'] "
        "when the server embeds, none otherwise; [] turns them off."
    ),
}
_LINKAGE = {
    "type": "string",
    "enum": ["average", "single", "complete"],
    "description": "How cluster distance is measured (default 'average').",
}

DEDUPLICATE_TOOL = types.Tool(
    name=DEDUPLICATE,
    title="De-duplicate chunks",
    description=(
        "Remove redundant chunks before they reach the model: near-duplicates are grouped "
        "and the best of each group is kept; with target_k, the survivors are re-ranked "
        "for relevance and diversity (MMR) down to target_k. Deterministic, no LLM calls. "
        "Returns {chunks: [{id, text, score, cluster_id}], stats: {input_count, "
        "output_count, cluster_count, reduction_pct, latency_ms, threshold_used, "
        "lambda_used}}."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "chunks": _CHUNKS,
            "threshold": _THRESHOLD,
            "lambda": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "MMR trade-off when target_k is set: 1 = relevance only, "
                "near 0 = diversity (default 0.5).",
            },
            "target_k": {
                "type": "integer",
                "minimum": 0,
                "description": "Return at most this many chunks, chosen by MMR "
                "(default 0: keep one per cluster, no re-ranking).",
            },
            "guards": _GUARDS,
            "linkage": _LINKAGE,
            "selection": {
                "type": "string",
                "enum": ["score", "centroid", "length", "hybrid"],
                "description": "Which chunk of a cluster is kept (with the coverage guard on: "
                "among those that say everything the others say): highest score (default), "
                "closest to the cluster centre, longest text, or a score/centre mix.",
            },
            "query": {
                "type": "string",
                "description": "The question the chunks answer; when given, MMR relevance "
                "is similarity to it instead of 'score'.",
            },
            "query_embedding": {
                "type": ["array", "string"],
                "items": {"type": "number"},
                "description": "The query's vector instead of its text (same dimension as "
                "the chunks').",
            },
            "explain": {
                "type": "boolean",
                "description": "Add an 'explain' object: each input chunk's fate (kept, "
                "duplicate of which, at what distance).",
            },
            "options": {
                "type": "object",
                "description": "Further options, as on the HTTP API.",
                "properties": {
                    "preserve_cache_prefix": {
                        "type": "boolean",
                        "description": "Return every chunk up to the last one with "
                        "'cache_control' untouched and first, so a prompt cache keeps hitting.",
                    }
                },
            },
        },
        "required": ["chunks"],
    },
    annotations=types.ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
)

ANALYZE_TOOL = types.Tool(
    name=ANALYZE,
    title="Analyze redundancy",
    description=(
        "Measure how redundant a set of chunks is without removing any: which chunks are "
        "near-duplicates of which. Returns {summary: {total_chunks, redundant_chunks, "
        "redundancy_pct, cluster_count, threshold_used}, clusters: [{cluster_id, size, "
        "member_ids, member_indices, is_redundant}], recommendation}."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "chunks": _CHUNKS,
            "threshold": _THRESHOLD,
            "guards": _GUARDS,
            "linkage": _LINKAGE,
        },
        "required": ["chunks"],
    },
    annotations=types.ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
)


def build_server(tools: DistillTools) -> Server:
    """The MCP server: two tools; a tool's bad input is a tool error, never a crash."""

    handlers = {DEDUPLICATE: tools.deduplicate, ANALYZE: tools.analyze}

    async def list_tools(ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[DEDUPLICATE_TOOL, ANALYZE_TOOL])

    async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        handler = handlers.get(params.name)
        if handler is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"unknown tool: {params.name}")
        try:
            payload = await handler(params.arguments or {}, ctx.session.report_progress)
        except ApiError as exc:
            return tool_error(exc.message)
        except Exception:  # a bug, not the caller's input: logged, never shown as a traceback
            log.exception("tool call %s failed", params.name)
            return tool_error("internal error")
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=jsonio.dumps(payload).decode())],
            structured_content=payload,
        )

    return Server(
        "distill",
        version=__version__,
        instructions=(
            f"Call {DEDUPLICATE} on chunks gathered from retrieval, search, tools or memory "
            f"before reasoning over them; {ANALYZE} to see the redundancy first."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


# --- transports -----------------------------------------------------------------------


class RequireApiKey:
    """ASGI: `/mcp` needs `Authorization: Bearer <key>` when keys are configured.

    The same check and messages as `/v1/*` on the HTTP API; `/health` stays open.
    """

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"] != "/health":
            try:
                check_api_key(Headers(scope=scope).get("authorization"), self.keys)
            except ApiError as exc:
                await JSONResponse({"error": exc.message}, exc.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def http_app(server: Server, config: Config, host: str):
    """Streamable HTTP at `/mcp` (with DNS-rebinding protection on a loopback host)."""

    async def health(request):
        return JSONResponse({"status": "ok"})

    app = server.streamable_http_app(
        host=host,
        max_request_body_size=config.max_body_bytes,
        custom_starlette_routes=[Route("/health", health, methods=["GET"])],
    )
    return RequireApiKey(app, config.api_keys)


async def serve_stdio(server: Server) -> None:
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distill-mcp", description="Distill's de-duplication as MCP tools."
    )
    parser.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="http: bind address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="http: port (8081)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"distill-mcp: {exc}", file=sys.stderr)
        return 2
    tools = DistillTools(config)
    threading.Thread(target=tools.warm_up, daemon=True).start()
    server = build_server(tools)
    if args.transport == "stdio":
        anyio.run(serve_stdio, server)
        return 0
    log.info("serving MCP at http://%s:%d/mcp", args.host, args.port)
    uvicorn.run(http_app(server, config, args.host), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
