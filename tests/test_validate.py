"""Unit tests of the request boundary: app/validate.py, app/config.py,
app/auth.py and app/jsonio.py (no HTTP, no model)."""

from __future__ import annotations

import base64
import math
import sys

import numpy as np
import pytest

from app import jsonio
from app.auth import check_api_key
from app.config import MIB, Config, ConfigError, load_config
from app.validate import ApiError, check_model_dimension, parse_request
from pipeline.embed import BUNDLED_MODEL

# --------------------------------------------------------------------------- helpers


def parse(body, **config):
    return parse_request(body, Config(**config))


def refused(body, **config) -> ApiError:
    """The ApiError `body` is refused with."""
    with pytest.raises(ApiError) as info:
        parse(body, **config)
    assert isinstance(info.value.message, str) and info.value.message
    return info.value


def text_body(**fields):
    """A valid one-chunk body plus top-level `fields`."""
    return {"chunks": [{"text": "hello"}], **fields}


def b64(values) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


# --------------------------------------------------------------------------- validate: happy path


def test_minimal_request_gets_every_default():
    request = parse({"chunks": [{"text": "hello"}]})
    assert request.threshold is None
    assert request.lambda_ is None
    assert request.target_k == 0
    assert request.guards is None
    assert request.linkage == "average"
    assert request.selection == "score"
    assert request.query is None
    assert request.query_embedding is None
    [chunk] = request.chunks
    assert (chunk.id, chunk.text, chunk.score, chunk.embedding) == ("", "hello", 0, None)
    assert request.needs_model
    assert request.texts_to_embed == [0]


def test_fields_are_carried_through():
    request = parse(
        {
            "chunks": [{"id": "a", "text": "x", "score": 0.9}, {"id": "b", "embedding": [3, 4]}],
            "threshold": 0.3,
            "lambda": 0.7,
            "target_k": 5,
            "guards": ["numbers"],
            "linkage": "complete",
            "selection": "hybrid",
        },
    )
    assert request.threshold == 0.3 and request.lambda_ == 0.7 and request.target_k == 5
    assert request.guards == ("numbers",)
    assert (request.linkage, request.selection) == ("complete", "hybrid")
    a, b = request.chunks
    assert (a.id, a.text, a.score) == ("a", "x", 0.9)
    assert (b.id, b.text, b.score) == ("b", "", 0)
    assert b.embedding.dtype == np.float32 and b.embedding.tolist() == [3.0, 4.0]
    assert request.texts_to_embed == [0]


def test_unknown_fields_are_ignored():
    request = parse({"chunks": [{"text": "x", "meta": {"k": 1}}], "extra": [1, "two"]})
    assert request.chunks[0].text == "x"


@pytest.mark.parametrize("body", [{}, {"threshold": None}, {"threshold": 0}, {"threshold": 0.0}])
def test_threshold_zero_null_or_missing_means_default(body):
    assert parse(text_body(**body)).threshold is None


@pytest.mark.parametrize("body", [{}, {"lambda": None}, {"lambda": 0}, {"lambda": 0.0}])
def test_lambda_zero_null_or_missing_means_default(body):
    assert parse(text_body(**body)).lambda_ is None


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("threshold", 2, 2.0), ("threshold", 1e-9, 1e-9), ("lambda", 1, 1.0), ("lambda", 0.25, 0.25)],
)
def test_bounds_are_inclusive_and_ints_become_floats(name, value, expected):
    request = parse(text_body(**{name: value}))
    got = request.threshold if name == "threshold" else request.lambda_
    assert got == expected and type(got) is float


@pytest.mark.parametrize("value", [None, 0])
def test_target_k_zero_or_null(value):
    assert parse(text_body(target_k=value)).target_k == 0


def test_target_k_big_integer():
    assert parse(text_body(target_k=10**6)).target_k == 10**6


def test_text_null_with_embedding_is_empty_text():
    [chunk] = parse({"chunks": [{"text": None, "id": None, "embedding": [1, 0]}]}).chunks
    assert (chunk.text, chunk.id) == ("", "")
    assert not parse({"chunks": [{"text": None, "embedding": [1, 0]}]}).needs_model


@pytest.mark.parametrize("empty", [None, [], ""])
def test_empty_embedding_means_embed_the_text(empty):
    request = parse({"chunks": [{"text": "x", "embedding": empty}]})
    assert request.chunks[0].embedding is None
    assert request.needs_model


def test_score_keeps_its_type_for_an_exact_echo():
    chunks = parse(
        {"chunks": [{"text": "a", "score": 3}, {"text": "b", "score": 0.9}, {"text": "c", "score": -2.5}]}
    ).chunks
    assert [c.score for c in chunks] == [3, 0.9, -2.5]
    assert [type(c.score) for c in chunks] == [int, float, float]


def test_score_beyond_int64_becomes_a_float64_like_go():
    low, high = parse(
        {"chunks": [{"text": "a", "score": 2**63 - 1}, {"text": "b", "score": 2**63}]}
    ).chunks
    assert low.score == 2**63 - 1 and type(low.score) is int
    assert high.score == float(2**63) and type(high.score) is float


def test_base64_embedding_decodes_little_endian_float32():
    values = [0.5, -1.25, 3.0e-3, 7.0]
    [chunk] = parse({"chunks": [{"embedding": b64(values)}]}).chunks
    assert chunk.embedding.dtype == np.float32
    assert chunk.embedding.tolist() == np.asarray(values, dtype=np.float32).tolist()


def test_list_embeddings_of_zeros_ones_and_big_integers_are_numbers():
    [a, b] = parse({"chunks": [{"embedding": [0, 1, 0.0, 1.0, -0.0]}, {"embedding": [2**70, 1, -(2**63), 0.5, 3]}]}).chunks
    assert a.embedding.dtype == b.embedding.dtype == np.float32
    assert a.embedding.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert b.embedding.tolist() == np.array([2.0**70, 1, -(2.0**63), 0.5, 3], dtype=np.float32).tolist()


def test_base64_and_list_embeddings_agree():
    values = np.random.default_rng(7).standard_normal(16).astype(np.float32)
    from_b64 = parse({"chunks": [{"embedding": b64(values)}]}).chunks[0].embedding
    from_list = parse({"chunks": [{"embedding": values.tolist()}]}).chunks[0].embedding
    assert np.array_equal(from_b64, from_list)


def test_guards_are_deduplicated_and_empty_means_none():
    assert parse(text_body(guards=["numbers", "numbers"])).guards == ("numbers",)
    assert parse(text_body(guards=[])).guards == ()
    assert parse(text_body(guards=None)).guards is None


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
def test_every_linkage_is_accepted(linkage):
    assert parse(text_body(linkage=linkage)).linkage == linkage


@pytest.mark.parametrize("selection", ["score", "centroid", "length", "hybrid"])
def test_every_selection_is_accepted(selection):
    assert parse(text_body(selection=selection)).selection == selection


def test_null_linkage_and_selection_are_defaults():
    request = parse(text_body(linkage=None, selection=None))
    assert (request.linkage, request.selection) == ("average", "score")


def test_query_text_needs_the_model_even_when_chunks_have_vectors():
    request = parse({"chunks": [{"embedding": [1, 0]}], "query": "what?"})
    assert request.query == "what?"
    assert request.texts_to_embed == []
    assert request.needs_model


def test_empty_query_is_no_query():
    assert parse(text_body(query="")).query is None


def test_query_embedding_does_not_need_the_model():
    request = parse({"chunks": [{"embedding": [1, 0]}], "query_embedding": [0, 1]})
    assert request.query_embedding.tolist() == [0.0, 1.0]
    assert not request.needs_model


def test_exactly_max_chunks_is_accepted():
    assert len(parse({"chunks": [{"text": "a"}] * 3}, max_chunks=3).chunks) == 3


def test_ids_may_repeat():
    chunks = parse({"chunks": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}).chunks
    assert [c.id for c in chunks] == ["x", "x"]


# --------------------------------------------------------------------------- validate: refusals

BAD_BODIES = [
    pytest.param([{"text": "a"}], "object", id="top-level-array"),
    pytest.param("chunks", "object", id="top-level-string"),
    pytest.param(None, "object", id="top-level-null"),
    pytest.param({}, "chunks", id="chunks-missing"),
    pytest.param({"chunks": None}, "chunks", id="chunks-null"),
    pytest.param({"chunks": []}, "chunks", id="chunks-empty"),
    pytest.param({"chunks": {"text": "a"}}, "chunks", id="chunks-object"),
    pytest.param({"chunks": "a"}, "chunks", id="chunks-string"),
    pytest.param({"chunks": ["a"]}, "chunks[0]", id="chunk-string"),
    pytest.param({"chunks": [None]}, "chunks[0]", id="chunk-null"),
    pytest.param({"chunks": [{"text": "a"}, {}]}, "chunks[1]", id="chunk-empty-object"),
    pytest.param({"chunks": [{"text": ""}]}, "chunks[0]", id="text-empty"),
    pytest.param({"chunks": [{"text": "", "embedding": []}]}, "chunks[0]", id="text-and-vector-empty"),
    pytest.param({"chunks": [{"text": 5}]}, "chunks[0].text", id="text-number"),
    pytest.param({"chunks": [{"text": ["a"]}]}, "chunks[0].text", id="text-array"),
    pytest.param({"chunks": [{"text": "a", "id": 1}]}, "chunks[0].id", id="id-number"),
    pytest.param({"chunks": [{"text": "a", "id": True}]}, "chunks[0].id", id="id-bool"),
    pytest.param({"chunks": [{"text": "a", "score": "0.9"}]}, "chunks[0].score", id="score-string"),
    pytest.param({"chunks": [{"text": "a", "score": True}]}, "chunks[0].score", id="score-bool"),
    pytest.param({"chunks": [{"text": "a", "score": math.inf}]}, "chunks[0].score", id="score-inf"),
    pytest.param({"chunks": [{"text": "a", "score": math.nan}]}, "chunks[0].score", id="score-nan"),
    pytest.param({"chunks": [{"embedding": ["1"]}]}, "chunks[0].embedding", id="vector-strings"),
    pytest.param({"chunks": [{"embedding": [True]}]}, "chunks[0].embedding", id="vector-bools"),
    pytest.param({"chunks": [{"embedding": [0.5, True]}]}, "chunks[0].embedding", id="vector-float-and-true"),
    pytest.param({"chunks": [{"embedding": [0.5, False, 0.0]}]}, "chunks[0].embedding", id="vector-float-and-false"),
    pytest.param({"chunks": [{"embedding": [1, 0, True]}]}, "chunks[0].embedding", id="vector-int-and-true"),
    pytest.param({"chunks": [{"embedding": [0.5, "1"]}]}, "chunks[0].embedding", id="vector-float-and-string"),
    pytest.param({"chunks": [{"embedding": [[1], 2]}]}, "chunks[0].embedding", id="vector-ragged"),
    pytest.param({"chunks": [{"embedding": [[1, 2]]}]}, "chunks[0].embedding", id="vector-nested"),
    pytest.param({"chunks": [{"embedding": [1, None]}]}, "chunks[0].embedding", id="vector-null-item"),
    pytest.param({"chunks": [{"embedding": {"0": 1}}]}, "chunks[0].embedding", id="vector-object"),
    pytest.param({"chunks": [{"embedding": 1.0}]}, "chunks[0].embedding", id="vector-number"),
    pytest.param({"chunks": [{"embedding": [1e39]}]}, "chunks[0].embedding", id="vector-float32-overflow"),
    pytest.param({"chunks": [{"embedding": [-1e39]}]}, "chunks[0].embedding", id="vector-float32-negative-overflow"),
    pytest.param({"chunks": [{"embedding": [10**400]}]}, "chunks[0].embedding", id="vector-huge-int"),
    pytest.param({"chunks": [{"embedding": [math.nan]}]}, "chunks[0].embedding", id="vector-nan"),
    pytest.param({"chunks": [{"embedding": "!!!!"}]}, "chunks[0].embedding", id="base64-invalid"),
    pytest.param({"chunks": [{"embedding": "AAAA AAAA"}]}, "chunks[0].embedding", id="base64-space"),
    pytest.param({"chunks": [{"embedding": "AAA="}]}, "chunks[0].embedding", id="base64-2-bytes"),
    pytest.param({"chunks": [{"embedding": "AAAAAAA="}]}, "chunks[0].embedding", id="base64-5-bytes"),
    pytest.param({"chunks": [{"embedding": b64([math.nan])}]}, "chunks[0].embedding", id="base64-nan"),
    pytest.param({"chunks": [{"embedding": b64([math.inf])}]}, "chunks[0].embedding", id="base64-inf"),
    pytest.param({"chunks": [{"embedding": [1, 0]}, {"embedding": [1, 0, 0]}]}, "dimension", id="mixed-dims"),
    pytest.param({"chunks": [{"embedding": [1, 0]}], "query_embedding": [1, 0, 0]}, "dimension", id="query-dim"),
    pytest.param(text_body(query_embedding=["x"]), "query_embedding", id="query-vector-strings"),
    pytest.param(text_body(query=5), "query", id="query-number"),
    pytest.param(text_body(threshold=-0.1), "threshold", id="threshold-negative"),
    pytest.param(text_body(threshold=2.0001), "threshold", id="threshold-over-2"),
    pytest.param(text_body(threshold="0.2"), "threshold", id="threshold-string"),
    pytest.param(text_body(threshold=True), "threshold", id="threshold-bool"),
    pytest.param(text_body(threshold=math.nan), "threshold", id="threshold-nan"),
    pytest.param(text_body(threshold=math.inf), "threshold", id="threshold-inf"),
    pytest.param(text_body(**{"lambda": -0.5}), "lambda", id="lambda-negative"),
    pytest.param(text_body(**{"lambda": 1.5}), "lambda", id="lambda-over-1"),
    pytest.param(text_body(**{"lambda": "0.5"}), "lambda", id="lambda-string"),
    pytest.param(text_body(target_k=-1), "target_k", id="target-k-negative"),
    pytest.param(text_body(target_k=3.0), "target_k", id="target-k-float"),
    pytest.param(text_body(target_k="3"), "target_k", id="target-k-string"),
    pytest.param(text_body(target_k=True), "target_k", id="target-k-bool"),
    pytest.param(text_body(guards=["nope"]), "guard", id="guards-unknown"),
    pytest.param(text_body(guards="numbers"), "guards", id="guards-string"),
    pytest.param(text_body(guards=[1]), "guards", id="guards-number-item"),
    pytest.param(text_body(linkage="ward"), "linkage", id="linkage-unknown"),
    pytest.param(text_body(linkage=["average"]), "linkage", id="linkage-list"),
    pytest.param(text_body(selection="random"), "selection", id="selection-unknown"),
]


@pytest.mark.parametrize(("body", "names"), BAD_BODIES)
def test_bad_body_is_a_400_naming_the_problem(body, names):
    error = refused(body)
    assert error.status == 400
    assert names in error.message


@pytest.mark.parametrize(
    "body",
    [
        {"chunks": [{"text": "a", "score": 10**400}]},
        text_body(threshold=10**400),
        text_body(**{"lambda": 10**400}),
    ],
    ids=["score", "threshold", "lambda"],
)
def test_integer_too_big_for_a_float64_is_a_400(body):
    assert refused(body).status == 400


def test_more_chunks_than_the_limit_is_a_413():
    error = refused({"chunks": [{"text": "a"}] * 4}, max_chunks=3)
    assert error.status == 413
    assert "DISTILL_MAX_CHUNKS" in error.message


def test_too_many_chunks_is_checked_before_the_chunks_themselves():
    assert refused({"chunks": [None] * 4}, max_chunks=3).status == 413


# --------------------------------------------------------------------------- check_model_dimension


def test_model_dimension_matches():
    check_model_dimension(parse({"chunks": [{"text": "a"}, {"embedding": [0.0] * 4}]}), 4)


def test_model_dimension_mismatch_is_a_400():
    request = parse({"chunks": [{"text": "a"}, {"embedding": [1.0] * 3}]})
    with pytest.raises(ApiError) as info:
        check_model_dimension(request, 384)
    assert info.value.status == 400
    assert "3" in info.value.message and "384" in info.value.message


def test_model_dimension_checks_the_query_vector_too():
    request = parse({"chunks": [{"text": "a"}], "query_embedding": [1.0, 2.0]})
    with pytest.raises(ApiError) as info:
        check_model_dimension(request, 384)
    assert info.value.status == 400


def test_model_dimension_with_no_given_vector_passes():
    check_model_dimension(parse({"chunks": [{"text": "a"}, {"text": "b"}]}), 384)


# --------------------------------------------------------------------------- config


def test_empty_environment_gives_the_documented_defaults():
    config = load_config({})
    assert config == Config()
    assert config.api_keys == ()
    assert config.threshold == 0.15
    assert config.lambda_ == 0.5
    assert config.model_threshold is None
    assert config.embedding_model == BUNDLED_MODEL
    assert config.max_chunks == 10_000
    assert config.max_body_bytes == 64 * MIB
    assert config.sse_heartbeat_s == 10.0


def test_empty_or_blank_values_mean_the_default():
    env = {
        name: value
        for name, value in zip(
            [
                "DISTILL_API_KEYS",
                "DISTILL_THRESHOLD",
                "DISTILL_LAMBDA",
                "DISTILL_MODEL_THRESHOLD",
                "DISTILL_EMBEDDING_MODEL",
                "DISTILL_MAX_CHUNKS",
                "DISTILL_MAX_BODY_BYTES",
                "DISTILL_SSE_HEARTBEAT_S",
            ],
            ["", " ", "\t", "", "  ", "", " ", ""],
        )
    }
    assert load_config(env) == Config()


def test_every_variable_is_read():
    config = load_config(
        {
            "DISTILL_API_KEYS": " k1, k2 ,,",
            "DISTILL_THRESHOLD": "0.2",
            "DISTILL_LAMBDA": "0.7",
            "DISTILL_MODEL_THRESHOLD": " 0.3 ",
            "DISTILL_EMBEDDING_MODEL": "BAAI/bge-small-en-v1.5",
            "DISTILL_MAX_CHUNKS": "50",
            "DISTILL_MAX_BODY_BYTES": "1024",
            "DISTILL_SSE_HEARTBEAT_S": "0.25",
        }
    )
    assert config == Config(
        api_keys=("k1", "k2"),
        threshold=0.2,
        lambda_=0.7,
        model_threshold=0.3,
        embedding_model="BAAI/bge-small-en-v1.5",
        max_chunks=50,
        max_body_bytes=1024,
        sse_heartbeat_s=0.25,
    )


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("DISTILL_THRESHOLD", "2", "threshold", 2.0),
        ("DISTILL_LAMBDA", "1", "lambda_", 1.0),
        ("DISTILL_MODEL_THRESHOLD", "2", "model_threshold", 2.0),
        ("DISTILL_SSE_HEARTBEAT_S", "3600", "sse_heartbeat_s", 3600.0),
        ("DISTILL_MAX_CHUNKS", "1", "max_chunks", 1),
    ],
)
def test_upper_bounds_are_inclusive(name, value, field, expected):
    assert getattr(load_config({name: value}), field) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DISTILL_THRESHOLD", "abc"),
        ("DISTILL_THRESHOLD", "0"),
        ("DISTILL_THRESHOLD", "-0.1"),
        ("DISTILL_THRESHOLD", "2.5"),
        ("DISTILL_THRESHOLD", "nan"),
        ("DISTILL_THRESHOLD", "inf"),
        ("DISTILL_LAMBDA", "0"),
        ("DISTILL_LAMBDA", "1.01"),
        ("DISTILL_LAMBDA", "half"),
        ("DISTILL_MODEL_THRESHOLD", "3"),
        ("DISTILL_MODEL_THRESHOLD", "0"),
        ("DISTILL_MAX_CHUNKS", "0"),
        ("DISTILL_MAX_CHUNKS", "-5"),
        ("DISTILL_MAX_CHUNKS", "1.5"),
        ("DISTILL_MAX_CHUNKS", "1e3"),
        ("DISTILL_MAX_CHUNKS", "many"),
        ("DISTILL_MAX_BODY_BYTES", "0"),
        ("DISTILL_MAX_BODY_BYTES", "64MiB"),
        ("DISTILL_SSE_HEARTBEAT_S", "0"),
        ("DISTILL_SSE_HEARTBEAT_S", "-1"),
        ("DISTILL_SSE_HEARTBEAT_S", "3601"),
        ("DISTILL_SSE_HEARTBEAT_S", "nan"),
        ("DISTILL_API_KEYS", " , ,"),
    ],
)
def test_bad_value_is_a_one_line_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError) as info:
        load_config({name: value})
    message = str(info.value)
    assert message.startswith(name)
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_load_config_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("DISTILL_MAX_CHUNKS", "7")
    monkeypatch.setenv("DISTILL_API_KEYS", "secret")
    config = load_config()
    assert config.max_chunks == 7
    assert config.api_keys == ("secret",)


# --------------------------------------------------------------------------- auth

KEYS = ("k1", "k2")


@pytest.mark.parametrize("header", ["Bearer k1", "Bearer k2", "k1", "k2", "Bearer  k2 "])
def test_known_key_is_accepted(header):
    check_api_key(header, KEYS)  # no exception


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_a_401(header):
    with pytest.raises(ApiError) as info:
        check_api_key(header, KEYS)
    assert (info.value.status, info.value.message) == (401, "Authorization header required")


@pytest.mark.parametrize(
    "header", ["Bearer k3", "k3", "Bearer k", "k", "k1k2", "Bearer k1,k2", "Bearer ", "Basic k1", "Bearerk1"]
)
def test_unknown_key_is_a_401(header):
    with pytest.raises(ApiError) as info:
        check_api_key(header, KEYS)
    assert (info.value.status, info.value.message) == (401, "Invalid API key")


def test_unknown_key_error_does_not_echo_the_keys():
    with pytest.raises(ApiError) as info:
        check_api_key("Bearer wrong", ("topsecret",))
    assert "topsecret" not in info.value.message and "wrong" not in info.value.message


# --------------------------------------------------------------------------- jsonio


def test_loads_parses_plain_json():
    assert jsonio.loads(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"a": 1} x',
        b"{'a': 1}",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"a": "\xff"}',
        b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes is not UTF-8
        b'{"a": "\xc3"}',
        # the lone-surrogate fallback must refuse the same things
        b'{"s": "\\ud800", "a": NaN}',
        b'{"s": "\\ud800", "a": -Infinity}',
        b'{"s": "\\ud800", "a": \xff}',
        b'{"s": "\\ud800", "a": [1,]}',
    ],
)
def test_loads_refuses_invalid_json(raw):
    with pytest.raises(jsonio.JSONError) as info:
        jsonio.loads(raw)
    assert str(info.value)
    assert isinstance(info.value, ValueError)


def test_lone_surrogates_become_replacement_characters_everywhere():
    raw = b'{"k\\udc00": ["a\\ud800b", {"x": "\\udfff"}], "n": 1.5, "t": true}'
    assert jsonio.loads(raw) == {"k\ufffd": ["a\ufffdb", {"x": "\ufffd"}], "n": 1.5, "t": True}


def test_surrogate_pair_is_kept():
    assert jsonio.loads(b'{"a": "\\ud83d\\ude00", "b": "\\ud800"}') == {"a": "\U0001F600", "b": "\ufffd"}


def test_lone_surrogate_result_encodes_as_valid_utf8():
    assert jsonio.dumps(jsonio.loads(b'["\\ud800"]')) == '["\ufffd"]'.encode()


def test_loads_keeps_key_order():
    assert list(jsonio.loads(b'{"z": 1, "a": 2, "m": 3}')) == ["z", "a", "m"]


def test_dumps_is_compact_keeps_insertion_order_and_shortest_floats():
    obj = {"z": 0.9, "a": 3, "m": [0.1, -2.5, 1e-3], "s": "é"}
    assert jsonio.dumps(obj) == '{"z":0.9,"a":3,"m":[0.1,-2.5,0.001],"s":"é"}'.encode()


def test_dumps_round_trips_float_and_int_scores_exactly():
    for value in [0.9, 0.1 + 0.2, 3, -7, 2**63 - 1, 123456.789e-10]:
        assert jsonio.loads(jsonio.dumps({"v": value}))["v"] == value
        assert type(jsonio.loads(jsonio.dumps({"v": value}))["v"]) is type(value)


# --------------------------------------------------------------------------- jsonio.RequestDecoder: orjson's values


def same_values(fast, reference) -> bool:
    """`fast` (the decoder's) equals `reference` (orjson's), a vector array standing for
    its list of numbers bit for bit; every other value of the same type."""
    if isinstance(fast, np.ndarray):
        numbers = isinstance(reference, list) and all(type(v) in (int, float) for v in reference)
        return numbers and fast.dtype == np.float64 and np.array_equal(
            fast.view(np.uint64), np.array(reference, dtype=np.float64).view(np.uint64)
        )
    if type(fast) is not type(reference):
        return False
    if isinstance(fast, dict):
        return list(fast) == list(reference) and all(same_values(fast[k], reference[k]) for k in fast)
    if isinstance(fast, list):
        return len(fast) == len(reference) and all(map(same_values, fast, reference))
    if isinstance(fast, float):
        return math.copysign(1, fast) == math.copysign(1, reference) and fast == reference
    return fast == reference


def assert_decodes_as_orjson(raw: bytes) -> None:
    try:
        reference = ("ok", jsonio.loads(raw))
    except jsonio.JSONError as exc:
        reference = ("error", str(exc))
    try:
        fast = ("ok", jsonio.RequestDecoder().loads(raw))
    except jsonio.JSONError as exc:
        fast = ("error", str(exc))
    assert fast[0] == reference[0], raw[:200]
    if fast[0] == "error":
        assert fast[1] == reference[1]
    else:
        assert same_values(fast[1], reference[1]), raw[:200]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"chunks": [{"id": "1", "embedding": [0.1, -2, 3e-5, -0.0, 0, 1E+2]}], "query_embedding": [1]}',
        b'{"chunks": [{"embedding": [1, 2]}, {"embedding": [[1], [2]]}]}',  # nested: flattened by simdjson
        b'{"chunks": [{"embedding": [[], [1, 2]]}]}',
        b'{"chunks": [{"embedding": [1, true]}, {"embedding": [null]}, {"embedding": ["1"]}, {"embedding": [{}]}]}',
        b'{"chunks": [{"embedding": [9007199254740993, 1]}]}',  # past 2**53: an int, not a float
        b'{"chunks": [{"embedding": [18446744073709551616]}]}',  # past 64 bits
        b'{"chunks": [{"embedding": [1e400]}]}',
        b'{"chunks": [{"embedding": [4.9e-324, 2.2250738585072011e-308, 1.7976931348623157e308]}]}',
        b'{"chunks": [{"embedding": [0.1000000000000000055511151231257827021181583404541015625]}]}',
        b'{"chunks": [{"text": "a [ b", "embedding": [1]}, {"text": "\\u005b", "embedding": [[1]]}]}',
        b'{"chunks": [{"text": "\\\\u005b", "embedding": [[1]]}, {"id": "[", "embedding": [2]}]}',
        b'{"chunks": [{"text": "a", "text": "b", "embedding": [1], "embedding": [[2]]}]}',  # repeated keys
        b'{"chunks": [{"embedding": [1]}], "chunks": 5}',
        b'{"a": {"x": 1, "x": [2]}, "chunks": [{"m": {"[": ["]"]}}]}',
        b'{"a\\u0000b": 1, "chunks": [{"te\\u0000xt": "x", "embedding": [1]}]}',  # a NUL in a key
        b'\xef\xbb\xbf{"chunks": []}',
        b'{"chunks": [{"text": "\\ud800", "embedding": [1]}]}',  # a lone surrogate
        b'{"chunks": [{"text": "\xff"}]}',
        b'{"chunks": [{"embedding": []}, {"embedding": ""}, {"embedding": null}, {"embedding": {}}]}',
        b'[[1, 2], {"embedding": [1]}]',
        b'[1, 2]',
        b'"x"',
        b"null",
        b"",
        b"{",
        b'{"chunks": [1, "a", null, [1]]}',
        b'{"chunks": [{"embedding": [1, 2]}]} x',
        b'{"chunks": [{"embedding": [1, 2,]}]}',
        b'{"chunks": [{"embedding": [01]}]}',
        b'{"chunks": [{"embedding": [NaN]}]}',
        b'{"chunks": [{"score": -0, "s2": -0.0, "s3": 1.5e3, "big": 12345678901234567890}]}',
        b" \t\r\n{\"chunks\" : [ { \"embedding\" : [ 1 , 2 ] } ] } \n",
    ],
)
def test_the_request_decoder_gives_orjsons_values_or_its_error(raw):
    assert_decodes_as_orjson(raw)


@pytest.mark.parametrize("depth", [1024, 1025])  # orjson's limit: deeper is an error
def test_the_request_decoder_nests_as_deep_as_orjson(depth):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # for the comparison's recursion, not the decoder's
    try:
        assert_decodes_as_orjson(b"[" * depth + b"]" * depth)
        assert_decodes_as_orjson(b'{"chunks": [{"m": ' + b"[" * (depth - 3) + b"]" * (depth - 3) + b"}]}")
    finally:
        sys.setrecursionlimit(limit)


def test_the_request_decoder_agrees_with_orjson_on_random_bodies():
    """Seeded random bodies built around what could differ: number forms, nested or mixed
    vectors, brackets and escapes in strings, repeated keys; then a byte or two mutated."""
    rng = np.random.default_rng(25)
    atoms = [b"0", b"-0", b"-0.0", b"1", b"1.5", b"1e5", b"-2E-3", b"0.1234567890123456789", b"9007199254740993",
             b"1e400", b"4.9e-324", b"true", b"null", b'"x"', b"[1]", b"[]", b"{}", b"[[2]]"]
    strings = [b'"a"', b'"["', b'"\\u005b"', b'"\\\\u005b"', b'"\\ud800"', b'"\\u00e9"', b'"[[x]]"', b'""', b'"a\\u0000"']

    def vector() -> bytes:
        if rng.random() < 0.7:
            return b"[" + b", ".join(str(v).encode() for v in rng.normal(size=rng.integers(1, 6)).round(rng.integers(1, 18))) + b"]"
        return b"[" + b",".join(atoms[i] for i in rng.integers(0, len(atoms), rng.integers(0, 4))) + b"]"

    def chunk() -> bytes:
        fields = [b'"embedding": ' + vector(), b'"text": ' + strings[rng.integers(len(strings))],
                  b'"id": ' + strings[rng.integers(len(strings))], b'"score": ' + atoms[rng.integers(len(atoms))]]
        if rng.random() < 0.1:
            fields.append(fields[rng.integers(len(fields))])  # a repeated key
        if rng.random() < 0.1:
            fields.append(strings[rng.integers(len(strings))] + b": [1]")  # any key
        rng.shuffle(fields)
        return b"{" + b", ".join(fields) + b"}"

    for _ in range(3000):
        raw = b'{"chunks": [' + b", ".join(chunk() for _ in range(rng.integers(1, 5))) + b'], "query_embedding": ' + vector() + b"}"
        if rng.random() < 0.3:
            raw = bytearray(raw)
            for _ in range(rng.integers(1, 3)):
                raw[rng.integers(len(raw))] = rng.choice(list(b'[]{},:"\\ 0e-.x'))
            raw = bytes(raw)
        assert_decodes_as_orjson(raw)


def test_the_request_decoder_gives_arrays_for_vectors_not_lists():
    decoded = jsonio.RequestDecoder().loads(b'{"chunks": [{"embedding": [1, 0.5]}], "query_embedding": [2]}')
    assert isinstance(decoded["chunks"][0]["embedding"], np.ndarray)
    assert isinstance(decoded["query_embedding"], np.ndarray)


def test_one_decoder_decodes_body_after_body(monkeypatch):
    decoder = jsonio.RequestDecoder()
    monkeypatch.setattr(jsonio, "loads", None)  # never left to orjson: simdjson's parser is reused
    for chunks in ([{"id": "0", "embedding": [0, 0.5]}] * 300, {"x": [1]}, "a", [{"id": "1", "embedding": [1]}]):
        decoded = decoder.loads(jsonio.dumps({"chunks": chunks, "query_embedding": [1, 2]}))
        assert same_values(decoded, {"chunks": chunks, "query_embedding": [1, 2]})


@pytest.mark.parametrize("seed", range(3))
def test_base64_fast_decoding_accepts_and_refuses_as_the_standard_library(seed):
    """pybase64 first, the standard library for what it refuses: the same vectors and messages
    as the standard library alone, on random strings near valid base64."""
    from app.validate import _b64decode_exact, _from_base64

    def reference(value: str):
        raw = _b64decode_exact(value, "e")
        if len(value) != 4 * -(-len(raw) // 3):
            raise ApiError(400, "e is not valid base64 (extra padding)")
        if len(raw) % 4:
            raise ApiError(400, f"e must decode to whole float32 values ({len(raw)} bytes)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)

    rng = np.random.default_rng(seed)
    alphabet = list("AB+/=a9\n -_é")
    for _ in range(20_000):
        value = "".join(rng.choice(alphabet, size=rng.integers(0, 14)))
        if rng.random() < 0.3:
            value = b64(rng.normal(size=rng.integers(0, 4)))
        outcomes = []
        for decode in (reference, lambda v: _from_base64(v, "e")):
            try:
                outcomes.append(("ok", decode(value).tobytes()))
            except ApiError as exc:
                outcomes.append(("error", exc.message))
        assert outcomes[0] == outcomes[1], value
