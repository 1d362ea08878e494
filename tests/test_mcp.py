"""`distill-mcp` through the `mcp` client SDK: stdio (a subprocess) and streamable HTTP.

The same questions over both transports: are both tools listed and described,
does `deduplicate_chunks` answer what `/v1/dedupe` answers (with progress),
is bad input a tool error with the HTTP API's message (and the next call
fine), and does a cancelled call stop its run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from app import create_app
from app.config import Config
from app.mcp_server import DistillTools, build_server

from .support import ROOT, FaultInjectingModel, free_port, synthetic_texts

API_KEY = "mcp-test-key"
SCRIPT = Path(sys.executable).with_name("distill-mcp")
CANCELLED = "call cancelled during the embedding stage"


PARAGRAPHS = (
    "Kubernetes restarts a container when its liveness probe fails. The probe can run a "
    "command inside the container, open a TCP socket, or send an HTTP GET request to a path "
    "such as /health; any status code from 200 to 399 counts as success. Set "
    "initialDelaySeconds long enough for the application to start, or the kubelet will kill "
    "it before it ever becomes healthy. A readiness probe is different: when it fails, the "
    "pod is removed from the Service's endpoints but keeps running, so traffic stops without "
    "a restart. Use readiness for temporary overload and liveness only for states the "
    "process cannot recover from on its own, such as a deadlock. Probes that call "
    "downstream dependencies are a common mistake: a database outage then restarts every "
    "replica at once and turns a partial failure into a full one.",
    "A sourdough starter is a culture of wild yeast and lactic acid bacteria kept alive "
    "with regular feedings of flour and water. Most bakers feed it once or twice a day at "
    "room temperature and keep it in the refrigerator between bakes. Before mixing a dough, "
    "the starter should be active: bubbly, domed, and roughly doubled in volume a few hours "
    "after feeding. The bacteria produce lactic and acetic acids that give the bread its "
    "sour taste, while the yeast produces the carbon dioxide that makes it rise. A long, "
    "cool bulk fermentation develops more flavour, and shaping the loaf tightly creates the "
    "surface tension that lets it hold its shape in the oven.",
    "The global interpreter lock in CPython allows only one thread to execute Python "
    "bytecode at a time. Threads still help with input and output, because a thread waiting "
    "on a socket or a file releases the lock, but pure Python computation does not run in "
    "parallel. Libraries written in C, such as NumPy, can release the lock around long "
    "computations, so matrix products on several threads can use several cores. For CPU "
    "bound Python code the usual answer is multiprocessing, which runs separate interpreters "
    "with separate locks at the cost of copying data between processes. Free-threaded builds "
    "of CPython remove the lock altogether, at some cost to single-threaded speed.",
    "Photosynthesis converts light energy into chemical energy stored in sugar. In the light "
    "reactions, which take place in the thylakoid membranes of the chloroplast, chlorophyll "
    "absorbs light and the energy splits water, releasing oxygen and producing ATP and "
    "NADPH. The Calvin cycle, in the stroma, then uses that ATP and NADPH to fix carbon "
    "dioxide from the air into three-carbon sugars, with the enzyme RuBisCO catalysing the "
    "first step. Plants in hot, dry climates have evolved C4 and CAM pathways that "
    "concentrate carbon dioxide around RuBisCO and reduce water loss through open stomata.",
    "Roman aqueducts carried water from distant springs into cities using gravity alone. "
    "Engineers surveyed a route with a steady, gentle downhill gradient, sometimes only a "
    "few centimetres per hundred metres, and most of the channel ran underground or along "
    "the surface rather than on the famous arched bridges. Where a valley was too deep for "
    "arches, they built inverted siphons of lead pipe. Settling tanks removed sediment, and "
    "distribution tanks in the city fed public fountains and baths first, then private "
    "houses that paid for a connection. Limescale deposits inside surviving channels still "
    "show how long some of them remained in use.",
)


def long_chunks() -> list[dict]:
    """Chunks like a retriever's (~700-1,000 characters), two of them near-copies of others."""
    texts = list(PARAGRAPHS) + [
        PARAGRAPHS[0].replace("A readiness probe is different", "A readiness probe works differently"),
        PARAGRAPHS[2] + " Most web services are bound by input and output anyway.",
    ]
    return [{"id": f"doc-{i}", "text": t, "score": round(1 - i / 20, 2)} for i, t in enumerate(texts)]


def big_request() -> dict:
    """Long enough to be cancelled mid-embedding: hundreds of model batches."""
    return {"chunks": [{"text": " ".join([t] * 12)} for t in synthetic_texts(400, seed=5)]}


BAD_CALLS = [
    {"chunks": []},
    {},
    {"chunks": "not a list"},
    {"chunks": [{"text": 3}]},
    {"chunks": [{"text": "a"}], "target_k": "3"},
    {"chunks": [{"text": "a"}], "threshold": 5},
    {"chunks": [{"text": "a"}, {"text": "b", "embedding": [0.1, 0.2, 0.3]}]},
    {"chunks": [{"embedding": [0.1, 0.2]}, {"embedding": [0.1, 0.2, 0.3]}]},
]


# --- transports -------------------------------------------------------------------------


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def stdio_server(log_path: Path):
    """A `Client` target: `distill-mcp` started as a subprocess speaking on stdin/stdout."""
    with open(log_path, "w") as errlog:
        params = StdioServerParameters(command=str(SCRIPT), env=server_env(), cwd=ROOT)
        yield lambda: Client(stdio_client(params, errlog=errlog))


class HttpServer:
    """`distill-mcp --transport http` on 127.0.0.1, behind an API key."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [str(SCRIPT), "--transport", "http", "--port", str(self.port)],
            cwd=ROOT, env=server_env(DISTILL_API_KEYS=f"other-key,{API_KEY}"),
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        for _ in range(600):
            if self.process.poll() is not None:
                raise RuntimeError(f"distill-mcp exited: {log_path.read_text()}")
            try:
                if httpx2.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx2.TransportError:
                anyio.run(anyio.sleep, 0.1)
        raise RuntimeError("distill-mcp did not start")

    def client(self, key: str = API_KEY) -> Client:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120)
        return Client(streamable_http_client(f"{self.url}/mcp", http_client=http))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    server = HttpServer(tmp_path_factory.mktemp("mcp") / "http.log")
    yield server
    server.stop()


@pytest.fixture(params=["stdio", "http"])
def connect(request, tmp_path, http_server):
    """A factory of connected clients, and the server's log, for each transport."""
    if request.param == "http":
        yield http_server.client, http_server.log_path
    else:
        log_path = tmp_path / "stdio.log"
        with stdio_server(log_path) as client:
            yield client, log_path


def run(scenario, *args):
    return anyio.run(scenario, *args)


# --- over both transports -------------------------------------------------------------


def test_lists_both_tools_with_described_arguments(connect):
    new_client, _ = connect

    async def scenario():
        async with new_client() as client:
            return {tool.name: tool for tool in (await client.list_tools()).tools}

    tools = run(scenario)
    assert set(tools) == {"deduplicate_chunks", "analyze_redundancy"}
    dedupe = tools["deduplicate_chunks"].input_schema
    assert dedupe["required"] == ["chunks"]
    for name in ("chunks", "threshold", "lambda", "target_k", "guards", "selection", "query", "explain", "options"):
        assert dedupe["properties"][name]["type"]
    assert set(tools["analyze_redundancy"].input_schema["properties"]) >= {"chunks", "threshold"}
    for tool in tools.values():
        assert tool.description
        assert all(spec.get("description") for spec in tool.input_schema["properties"].values())


def test_text_only_chunks_give_what_the_http_api_gives_with_progress(connect, client):
    new_client, _ = connect
    body = {"chunks": long_chunks()}
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async def scenario():
        async with new_client() as mcp:
            return await mcp.call_tool("deduplicate_chunks", body, progress_callback=on_progress)

    result = run(scenario)
    expected = client.post("/v1/dedupe", json=body).get_json()
    assert not result.is_error
    answer = json.loads(result.content[0].text)
    assert answer == result.structured_content
    assert answer["chunks"] == expected["chunks"]
    assert answer["stats"]["output_count"] < answer["stats"]["input_count"]  # something was merged
    stats = {k: v for k, v in answer["stats"].items() if k != "latency_ms"}
    assert list(stats) == [
        "input_count", "output_count", "cluster_count", "reduction_pct", "threshold_used", "lambda_used"
    ]
    assert stats["threshold_used"] == 0.27  # model mode: the bundled model's calibrated value
    assert stats["lambda_used"] == 0.5
    for key in ("input_count", "output_count", "cluster_count", "reduction_pct"):
        assert stats[key] == expected["stats"][key]

    values = [value for value, _, _ in progress]
    assert values == sorted(set(values)) and values[0] == 0.0
    events = [json.loads(message) for _, _, message in progress]
    assert [e["stage"] for e in events if e["progress"] == 1.0] == ["embedding", "clustering", "selection"]
    assert events[-1]["stats"]["selected"] == answer["stats"]["output_count"]
    assert {total for _, total, _ in progress} == {4}


def test_bad_input_is_a_tool_error_with_the_http_message_and_the_server_goes_on(connect, client):
    new_client, _ = connect

    async def scenario():
        async with new_client() as mcp:
            errors = [await mcp.call_tool("deduplicate_chunks", args) for args in BAD_CALLS]
            good = await mcp.call_tool("deduplicate_chunks", {"chunks": [{"text": "still here"}]})
            return errors, good

    errors, good = run(scenario)
    for args, result in zip(BAD_CALLS, errors):
        expected = client.post("/v1/dedupe", json=args)
        assert expected.status_code == 400
        assert result.is_error
        assert result.content[0].text == expected.get_json()["error"]
    assert not good.is_error
    assert good.structured_content["chunks"][0]["text"] == "still here"


def test_analyze_redundancy_names_the_clusters(connect):
    new_client, _ = connect
    chunks = long_chunks()

    async def scenario():
        async with new_client() as mcp:
            return await mcp.call_tool("analyze_redundancy", {"chunks": chunks})

    answer = run(scenario).structured_content
    summary, clusters = answer["summary"], answer["clusters"]
    assert summary["total_chunks"] == len(chunks) == sum(c["size"] for c in clusters)
    assert summary["cluster_count"] == len(clusters) < len(chunks)
    assert summary["redundant_chunks"] == len(chunks) - len(clusters)
    assert summary["redundancy_pct"] == round(100 * summary["redundant_chunks"] / len(chunks), 1)
    merged = [c for c in clusters if c["is_redundant"]]
    assert [c["member_ids"] for c in merged] == [["doc-0", "doc-5"], ["doc-2", "doc-6"]]
    assert all(c["size"] == 1 for c in clusters if not c["is_redundant"])
    assert [c["cluster_id"] for c in clusters] == list(range(len(clusters)))
    assert "deduplicate_chunks" in answer["recommendation"]
    assert "\n" not in answer["recommendation"]


def test_a_cancelled_call_stops_its_run_and_the_next_call_works(connect):
    new_client, log_path = connect
    progress_started = anyio.Event()

    async def on_progress(value, total, message):
        progress_started.set()

    async def scenario():
        async with new_client() as mcp:
            async with anyio.create_task_group() as group:

                async def call():
                    await mcp.call_tool("deduplicate_chunks", big_request(), progress_callback=on_progress)
                    pytest.fail("the call finished instead of being cancelled")

                group.start_soon(call)
                await progress_started.wait()
                group.cancel_scope.cancel()
            return await mcp.call_tool("deduplicate_chunks", {"chunks": [{"text": "next"}]})

    assert not run(scenario).is_error
    assert run(wait_for_line, log_path, CANCELLED)


async def wait_for_line(path: Path, text: str, timeout: float = 60) -> bool:
    """Whether `text` shows up in the log at `path` within `timeout` seconds."""
    with anyio.move_on_after(timeout):
        while text not in path.read_text():
            await anyio.sleep(0.05)
        return True
    return False


# --- HTTP only --------------------------------------------------------------------------


INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "test", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.mark.parametrize(
    "authorization, message",
    [(None, "Authorization header required"), ("Bearer wrong", "Invalid API key")],
)
def test_http_refuses_a_missing_or_wrong_key_as_the_http_api_does(http_server, authorization, message):
    headers = dict(MCP_HEADERS, **({"Authorization": authorization} if authorization else {}))
    response = httpx2.post(f"{http_server.url}/mcp", json=INITIALIZE, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": message}
    assert httpx2.get(f"{http_server.url}/health").status_code == 200  # liveness stays open


def test_http_accepts_any_configured_key_bare_or_bearer(http_server):
    for authorization in (f"Bearer {API_KEY}", API_KEY, "Bearer other-key"):
        headers = dict(MCP_HEADERS, Authorization=authorization)
        response = httpx2.post(f"{http_server.url}/mcp", json=INITIALIZE, headers=headers)
        assert response.status_code == 200, response.text

    async def scenario():
        async with http_server.client(key="wrong") as mcp:
            await mcp.list_tools()

    with pytest.raises(BaseExceptionGroup) as refused:  # the SDK's task groups wrap the error
        run(scenario)
    assert refused.group_contains(MCPError, match="error response")


# --- in process (the same server object, no subprocess) ----------------------------------


class CountingModel:
    """The real model, counting the texts it is asked to embed (to see when work stops)."""

    def __init__(self, model):
        self.model, self.name, self.batch_size = model, model.name, model.batch_size
        self.texts = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):  # dim, window_tokens, count_tokens, token_spans
        return getattr(self.model, name)

    def encode(self, texts):
        with self.lock:
            self.texts += len(texts)
        return self.model.encode(texts)


class LogWaiter(logging.Handler):
    """Sets `seen` when a record containing `text` is logged."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record):
        if self.text in record.getMessage():
            self.seen.set()


def in_process(embedder, **config) -> Client:
    return Client(build_server(DistillTools(Config(**config), embedder=embedder)), mode="legacy")


def test_cancelling_closes_the_runner_between_steps(embedder):
    model = CountingModel(embedder)
    body = big_request()
    waiter = LogWaiter(CANCELLED)
    logger = logging.getLogger("distill.mcp")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(waiter)
    started = anyio.Event()

    async def on_progress(value, total, message):
        started.set()

    async def scenario():
        async with in_process(model) as mcp:
            async with anyio.create_task_group() as group:
                group.start_soon(lambda: mcp.call_tool("deduplicate_chunks", body, progress_callback=on_progress))
                await started.wait()
                group.cancel_scope.cancel()
            await anyio.to_thread.run_sync(waiter.seen.wait, 60)
            stopped_at = model.texts
            await mcp.call_tool("deduplicate_chunks", {"chunks": [{"text": "after"}]})
            return stopped_at

    try:
        stopped_at = run(scenario)
    finally:
        logger.removeHandler(waiter)
        logger.setLevel(level)
    assert waiter.seen.is_set()
    assert 0 < stopped_at < len(body["chunks"])  # some batches ran, most never did
    assert model.texts == stopped_at + 1  # after the cancel only the next call's one text


def test_go_mode_reports_go_defaults_and_skips_the_embedding_stage(embedder):
    chunks = [
        {"id": "a", "text": "x", "embedding": [1.0, 0.0, 0.0]},
        {"id": "b", "text": "y", "embedding": [0.99, 0.1, 0.0]},
        {"id": "c", "text": "z", "embedding": [0.0, 1.0, 0.0]},
        {"id": "d", "text": "w", "embedding": [0.0, 0.0, 1.0]},
    ]
    stages: list[str] = []

    async def on_progress(value, total, message):
        stages.append(json.loads(message)["stage"])

    async def scenario():
        async with in_process(embedder) as mcp:
            plain = await mcp.call_tool("deduplicate_chunks", {"chunks": chunks}, progress_callback=on_progress)
            tuned = await mcp.call_tool(
                "deduplicate_chunks", {"chunks": chunks, "threshold": 0.5, "lambda": 0.7, "target_k": 2}
            )
            return plain.structured_content, tuned.structured_content

    plain, tuned = run(scenario)
    assert [c["id"] for c in plain["chunks"]] == ["a", "c", "d"]
    assert (plain["stats"]["threshold_used"], plain["stats"]["lambda_used"]) == (0.15, 0.5)
    assert "embedding" not in stages and stages[0] == "clustering"
    assert (tuned["stats"]["threshold_used"], tuned["stats"]["lambda_used"]) == (0.5, 0.7)
    assert tuned["stats"]["output_count"] == 2


def test_analyze_without_redundancy_says_so(embedder):
    async def scenario():
        async with in_process(embedder) as mcp:
            return await mcp.call_tool(
                "analyze_redundancy", {"chunks": [{"text": t} for t in synthetic_texts(3)], "threshold": 0.01}
            )

    answer = run(scenario).structured_content
    assert answer["summary"] == {
        "total_chunks": 3, "redundant_chunks": 0, "redundancy_pct": 0.0,
        "cluster_count": 3, "threshold_used": 0.01,
    }
    assert answer["recommendation"].startswith("No redundancy")


def test_an_unknown_tool_is_a_protocol_error(embedder):
    async def scenario():
        async with in_process(embedder) as mcp:
            try:
                await mcp.call_tool("retrieve_deduplicated", {"query": "x"})
            except MCPError as exc:
                return exc

    error = run(scenario)
    assert error is not None and error.code == INVALID_PARAMS
    assert "unknown tool: retrieve_deduplicated" in str(error)


def test_a_failing_stage_is_a_tool_error_as_the_http_api_words_it(embedder):
    broken = FaultInjectingModel(embedder)
    body = {"chunks": [{"text": "a"}, {"text": "b"}]}

    async def scenario():
        async with in_process(broken) as mcp:
            return await mcp.call_tool("deduplicate_chunks", body)

    result = run(scenario)
    expected = create_app(Config(), embedder=broken).test_client().post("/v1/dedupe", json=body)
    assert expected.status_code == 500
    assert result.is_error
    assert result.content[0].text == expected.get_json()["error"] == "internal error in stage embedding"
