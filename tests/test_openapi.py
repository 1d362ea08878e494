"""app/openapi.json against the code, and property-based API tests generated from it.

Drift: the document is valid OpenAPI 3.1; its operations are Flask's URL map
and the index; its enums and defaults are the pipeline's; a body is valid for
its request schema exactly when `validate.parse_request` accepts it (bounds,
nulls, enums, base64, float32 range probed at the edges).

Properties (schemathesis, in-process over WSGI, valid and invalid bodies):
never a 5xx, every error is JSON `{"error": str}`, statuses, content types,
headers and bodies conform to the document, a stream ends with `complete`.
tests/fuzz_gunicorn.py runs the same properties over HTTP with more examples.
"""

from __future__ import annotations

import base64
import configparser
import json
import math
import re

import jsonschema
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate as validate_openapi
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import __version__, jsonio
from app.api import ENDPOINTS
from app.config import Config
from app.openapi import document, served_document
from app.validate import ApiError, parse_request
from pipeline.types import GUARDS, LINKAGES, SELECTIONS

from .support import ROOT, SSEParser

DOC = document()
SCHEMAS = DOC["components"]["schemas"]
REQUEST = SCHEMAS["DedupeRequest"]["properties"]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
MAX_CHUNKS = 3  # for the property tests: every generated text goes through the model


def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator for components/schemas/<name>, with the document's $refs resolvable."""
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    )


def openapi_path(flask_rule: str) -> str:
    """`/items/<int:id>` -> `/items/{id}`."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", flask_rule)


def assert_conforms(name: str, value) -> None:
    errors = [error.message for error in schema_validator(name).iter_errors(value)]
    assert not errors, f"not a valid {name}: {errors[:3]}"


# --------------------------------------------------------------------------- the document


def test_document_is_valid_openapi_3_1():
    validate_openapi(DOC)
    assert DOC["openapi"].startswith("3.1.")
    assert DOC["info"]["version"] == __version__


def test_operations_are_the_url_map_and_the_index(make_app):
    app = make_app()
    routes = {
        f"{method} {openapi_path(rule.rule)}"
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}  # HEAD: Werkzeug's; OPTIONS: any path
    }
    documented = {
        f"{method.upper()} {path}"
        for path, item in DOC["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert documented == routes
    assert set(ENDPOINTS) == routes


def test_every_status_the_app_raises_is_documented():
    raised = {
        int(code)
        for path in (ROOT / "app").glob("*.py")
        for code in re.findall(r"ApiError\(\s*(\d{3})", path.read_text())
    } - {500}  # a bug, never an answer to bad input
    for path in ("/v1/dedupe", "/v1/dedupe/stream"):
        assert set(map(int, DOC["paths"][path]["post"]["responses"])) == raised | {200}


def test_served_document_is_the_file_with_the_servers_chunk_limit(make_app):
    response = make_app(max_chunks=7).test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    served = response.get_json()
    assert served["components"]["schemas"]["DedupeRequest"]["properties"]["chunks"]["maxItems"] == 7
    served["components"]["schemas"]["DedupeRequest"]["properties"]["chunks"]["maxItems"] = 10_000
    assert served == DOC
    assert REQUEST["chunks"]["maxItems"] == Config().max_chunks


def test_document_ships_with_the_package():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "openapi.json" in setup["options.package_data"]["app"].split()


def test_enums_and_defaults_are_the_pipelines():
    def values(schema):
        return tuple(v for v in schema["enum"] if v is not None)

    assert values(REQUEST["linkage"]) == LINKAGES
    assert values(REQUEST["selection"]) == SELECTIONS
    assert values(REQUEST["guards"]["items"]) == GUARDS
    parsed = parse_request({"chunks": [{"text": "a"}]}, Config())
    assert parsed.linkage == REQUEST["linkage"]["default"]
    assert parsed.selection == REQUEST["selection"]["default"]
    assert parsed.target_k == REQUEST["target_k"]["default"]
    chunk = SCHEMAS["Chunk"]["properties"]
    got = parsed.chunks[0]
    assert (got.id, got.score) == (chunk["id"]["default"], chunk["score"]["default"])


def test_response_keys_are_in_the_documented_order(client):
    body = {"chunks": [{"id": "a", "embedding": [1, 0]}, {"id": "b", "embedding": [0, 1]}]}
    result = client.post("/v1/dedupe", json=body).get_json()
    assert_conforms("DedupeResponse", result)
    for name, obj in [
        ("DedupeResponse", result),
        ("OutputChunk", result["chunks"][0]),
        ("Stats", result["stats"]),
    ]:
        assert list(obj) == SCHEMAS[name]["required"]
        assert list(SCHEMAS[name]["properties"])[: len(obj)] == list(obj)  # optional keys last


def test_a_frozen_cache_prefix_answer_has_every_documented_stat_in_order(client):
    frozen = {"id": "p", "text": "system prompt", "cache_control": {"type": "ephemeral"}}
    suffix = [{"id": "a", "embedding": [1, 0]}, {"id": "b", "embedding": [0, 1]}]
    body = {"chunks": [frozen, *suffix], "options": {"preserve_cache_prefix": True}}
    result = client.post("/v1/dedupe", json=body).get_json()
    assert_conforms("DedupeResponse", result)
    assert list(result["stats"]) == list(SCHEMAS["Stats"]["properties"])
    assert result["chunks"][0]["cluster_id"] == -1
    every_chunk_frozen = client.post("/v1/dedupe", json={**body, "chunks": [frozen]}).get_json()
    assert_conforms("DedupeResponse", every_chunk_frozen)


def test_explain_is_documented_and_in_order(client):
    body = {"chunks": [{"id": "a", "embedding": [1, 0]}, {"id": "b", "embedding": [1, 0.01]}], "explain": True}
    result = client.post("/v1/dedupe", json=body).get_json()
    assert_conforms("DedupeResponse", result)
    assert list(result) == list(SCHEMAS["DedupeResponse"]["properties"])
    assert list(result["explain"]) == list(SCHEMAS["Explain"]["properties"]) == SCHEMAS["Explain"]["required"]
    row = result["explain"]["chunks"][1]
    assert list(row) == list(SCHEMAS["ExplainChunk"]["properties"]) == SCHEMAS["ExplainChunk"]["required"]
    assert row["state"] == "duplicate" and SCHEMAS["ExplainChunk"]["properties"]["state"]["enum"][1] == "duplicate"


# ------------------------------------------- the request schema accepts what the code accepts


def accepted(body, config: Config = Config()) -> bool:
    """Whether the app takes `body` as sent: parsed by jsonio, then validated."""
    try:
        parse_request(jsonio.loads(json.dumps(body).encode()), config)
    except jsonio.JSONError:
        return False
    except ApiError as exc:
        assert exc.status in (400, 413)
        return False
    return True


def with_field(name, value) -> dict:
    return {"chunks": [{"text": "a"}], name: value}


def with_chunk(**fields) -> dict:
    return {"chunks": [fields]}


def edges(schema) -> list:
    """Values at and just past a number schema's documented bounds."""
    integer = "integer" in schema["type"]

    def past(bound, direction):
        return bound + direction if integer else math.nextafter(bound, direction * math.inf)

    out = []
    for key, direction in [("minimum", -1), ("maximum", 1)]:
        if key in schema:
            out += [schema[key], past(schema[key], direction)]
    for key, direction in [("exclusiveMinimum", -1), ("exclusiveMaximum", 1)]:
        if key in schema:
            out += [schema[key], past(schema[key], -direction)]
    return out


def base64_samples() -> list[str]:
    """Valid base64 of 0..24 bytes, and the same strings broken in the usual ways."""
    valid = [base64.b64encode(bytes(range(n))).decode() for n in range(25)]
    broken = [s.rstrip("=") for s in valid] + [s + "A" for s in valid] + [s[1:] for s in valid]
    return valid + broken + ["AAAA AAA", "AA==AAAA", "====", "AAA-AAA_", "AAAAAAA\n"]


def over_padded_base64() -> list[str]:
    """Whole float32s in base64, then stray padding (invalid base64)."""
    return [base64.b64encode(bytes(n)).decode() + pad for n in (12, 24) for pad in ("=", "==")]


def request_samples() -> list:
    float32 = SCHEMAS["Float32"]
    samples = [None, [], {}, {"chunks": None}, {"chunks": []}, {"chunks": {}}, {"chunks": [1]}]
    samples += [{"chunks": [{"text": "a"}] * n} for n in (1, 3, 4)]  # maxItems: see below
    for name in ("threshold", "lambda", "target_k"):
        samples += [with_field(name, v) for v in [None, 0, 1, 1.5, True, "1", *edges(REQUEST[name])]]
    for name in ("guards", "linkage", "selection"):
        samples += [with_field(name, v) for v in [None, [], "x", ["x"], [1], *LINKAGES, *SELECTIONS]]
        samples += [with_field(name, list(GUARDS)), with_field(name, list(GUARDS) * 2)]
    samples += [with_field("query", v) for v in [None, "", "q", 1, ["q"]]]
    samples += [with_field("query_embedding", v) for v in [None, [], "", [1], "AAAAAA==", 1, [None]]]
    for value in [None, "", "a", 1, [], {}]:
        samples += [with_chunk(text=value), with_chunk(id=value, text="a")]
        samples += [with_chunk(text="a", score=value), with_chunk(embedding=value)]
    samples += [with_chunk(text="a", score=v) for v in [-1.5, 1e308, -(2**63), True]]
    samples += [with_chunk(embedding=[v]) for v in [0, -1, 1e-46, True, "1", None, *edges(float32)]]
    samples += [with_chunk(text="a", embedding=s) for s in base64_samples()]
    samples += [with_chunk(text="a", embedding=[[1.0]]), with_chunk(text="a", embedding={"a": 1})]
    samples += [with_field("explain", v) for v in [None, True, False, 0, 1, "true", [], {}]]
    samples += [{"chunks": [{"text": "a"}], "unknown": [1]}, {"chunks": [{"text": "a", "x": None}]}]
    odd = [None, "", "x", 0, 1, 1.5, True, False, [], ["x"], {}, {"type": "ephemeral"}]
    samples += [with_field("options", v) for v in odd]
    samples += [with_field("options", {"preserve_cache_prefix": v}) for v in odd]
    samples += [with_chunk(text="a", cache_control=v) for v in odd]
    return samples


def test_request_schema_accepts_exactly_what_the_validator_accepts():
    """Within what a JSON Schema can say (not: dimensions, `3.0` as target_k, huge ints)."""
    config = Config(max_chunks=3)
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/DedupeRequest", "components": served_document(3)["components"]}
    )
    verdicts = [(body, accepted(body, config)) for body in request_samples()]
    assert [(body, ok) for body, ok in verdicts if validator.is_valid(body) != ok] == []


def test_over_padded_base64_is_refused():
    for value in over_padded_base64():
        assert not accepted(with_chunk(text="a", embedding=value)), value


def test_documented_nulls_mean_absent():
    """Every request field whose schema allows null takes null as "absent" (the default)."""

    def allows_null(schema) -> bool:
        schema = SCHEMAS["Embedding"] if "$ref" in schema else schema
        return "null" in schema.get("type", []) or {"type": "null"} in schema.get("oneOf", [])

    def parsed(body) -> str:
        return repr(parse_request(body, Config()))  # repr: numpy arrays do not compare with ==

    for name, schema in REQUEST.items():
        if name != "chunks":
            assert allows_null(schema), name
            assert parsed(with_field(name, None)) == parsed(with_field("unknown", 0)), name
    full = {"id": "i", "text": "t", "embedding": [1.0], "score": 1}
    for name, schema in SCHEMAS["Chunk"]["properties"].items():
        assert allows_null(schema), name
        absent = {k: v for k, v in full.items() if k != name}
        assert parsed(with_chunk(**{**full, name: None})) == parsed(with_chunk(**absent)), name


# --------------------------------------------------------------------------- properties


def errors_are_json(ctx, response, case):
    """Every 4xx/5xx is JSON {"error": <non-empty string>} and nothing else."""
    if response.status_code >= 400:
        assert response.headers["content-type"] == ["application/json"]
        body = json.loads(response.content)
        assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]


def stream_completes(ctx, response, case):
    """A 200 stream: documented events, ending with its one terminal event, `complete`."""
    if case.path != "/v1/dedupe/stream" or response.status_code != 200:
        return
    events = SSEParser().feed(response.content.decode())
    assert [e.type for e in events if e.type in ("complete", "error")] == ["complete"], events[-1:]
    assert events[-1].type == "complete"
    assert_conforms("DedupeResponse", events[-1].json)
    for event in events[:-1]:
        assert event.type == "progress", event
        assert_conforms("ProgressEvent", event.json)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    errors_are_json,
    stream_completes,
]


def property_schema(max_chunks: int):
    """Schemathesis' view of the served document: valid and invalid data, every phase.

    Too many chunks is a 413. OPTIONS is no "unexpected method": any path answers a
    CORS preflight with 200.
    """
    schema = schemathesis.openapi.from_dict(served_document(max_chunks))
    schema.config.generation.update(modes=list(schemathesis.GenerationMode))
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    coverage = schema.config.phases.coverage
    coverage.unexpected_methods = set(coverage.unexpected_methods) - {"options"}
    return schema


# Loaded at import, not with schemathesis.pytest.from_fixture: that one needs a pytest
# internal (Node._nodeid) that pytest 9.2 removed. The app comes from a fixture instead.
api_schema = property_schema(MAX_CHUNKS)


@api_schema.parametrize()
@settings(
    max_examples=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_the_document(case, make_app):
    case.call_and_validate(app=make_app(max_chunks=MAX_CHUNKS), checks=CHECKS)
