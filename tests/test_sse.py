"""Tests for sse/: frames are checked byte-for-byte and round-tripped through a
small WHATWG-style parser, so they hold for what a real client would read."""

import math
import re

import orjson
import pytest

from sse import Stage, StageTimer, Writer, comment, encode, encode_json


def parse(stream: bytes) -> list[tuple[str, str]]:
    """Minimal WHATWG event-stream parser: returns (event type, data) per dispatch."""
    events, event_type, data = [], "", []
    for line in re.split(r"\r\n|\r|\n", stream.decode("utf-8")):
        if line == "":
            if data:
                events.append((event_type or "message", "\n".join(data)))
            event_type, data = "", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event_type = value
            elif field == "data":
                data.append(value)
    return events


def parse_json(frame: bytes) -> tuple[str, object]:
    [(event_type, data)] = parse(frame)
    return event_type, orjson.loads(data)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_new_writer_has_written_nothing():
    assert Writer().frames_written == 0


def test_progress():
    frame = Writer().progress(Stage.CLUSTERING, 0.5)
    assert frame == b'event: progress\ndata: {"stage":"clustering","progress":0.5}\n\n'
    assert parse_json(frame) == ("progress", {"stage": "clustering", "progress": 0.5})


def test_progress_with_stats_keeps_key_order():
    frame = Writer().progress(Stage.SELECTION, 1.0, {"selected": 3, "duration_ms": 7})
    data = parse(frame)[0][1]
    assert data == '{"stage":"selection","progress":1.0,"stats":{"selected":3,"duration_ms":7}}'


def test_complete_sends_result_as_given():
    result = {"chunks": [{"id": "a", "text": "x"}], "stats": {"output_count": 1}}
    assert parse_json(Writer().complete(result)) == ("complete", result)


def test_error():
    frame = Writer().error("model failed", Stage.EMBEDDING)
    assert parse_json(frame) == ("error", {"error": "model failed", "stage": "embedding"})


def test_several_events_in_order_and_counted():
    writer = Writer()
    stream = b"".join([
        writer.progress(Stage.MMR, 0),
        writer.heartbeat(),
        writer.progress(Stage.MMR, 1, {"output_count": 2}),
        writer.complete({"chunks": [], "stats": {}}),
    ])
    assert writer.frames_written == 4
    assert [event for event, _ in parse(stream)] == ["progress", "progress", "complete"]
    assert b"\n: keep-alive\n\n" in stream


def test_stage_timer_with_fake_clock():
    clock = FakeClock()
    timer = StageTimer(clock=clock)
    clock.now += 0.25
    assert timer.elapsed_s() == 0.25
    clock.now += 0.0009765625  # 0.2509765625 s in total: truncated, not rounded
    assert timer.elapsed_ms() == 250
    timer.restart()
    assert timer.elapsed_ms() == 0
    clock.now += 1.5
    assert timer.elapsed_ms() == 1500


def test_stage_timer_defaults_to_a_real_clock():
    assert StageTimer().elapsed_s() >= 0.0


def test_stage_names():
    assert (Stage.EMBEDDING, Stage.CLUSTERING, Stage.SELECTION, Stage.MMR) == (
        "embedding", "clustering", "selection", "mmr")


def test_multiline_data_split_on_cr_lf_and_crlf():
    frame = encode("note", "a\rb\nc\r\nd")
    assert frame == b"event: note\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert parse(frame) == [("note", "a\nb\nc\nd")]


def test_empty_data_and_no_event_name():
    frame = encode(None, "")
    assert frame == b"data: \n\n"
    assert parse(frame + encode(None, "x")) == [("message", ""), ("message", "x")]


def test_unicode_survives_as_utf8():
    text = "déjà vu — 重複 🚀"
    frame = Writer().error(text, Stage.MMR)
    assert text.encode("utf-8") in frame
    assert parse_json(frame)[1]["error"] == text


def test_newline_inside_json_string_stays_on_one_data_line():
    frame = encode_json("complete", {"text": "line1\nline2\r\nline3"})
    assert frame.count(b"data: ") == 1
    assert b"line1\\nline2\\r\\nline3" in frame
    assert parse_json(frame)[1] == {"text": "line1\nline2\r\nline3"}


@pytest.mark.parametrize("frame", [
    encode("e", "a\nb"), encode(None, ""), encode_json("e", [1]), comment(), comment("x"),
    Writer().progress(Stage.EMBEDDING, 0.1), Writer().complete({}),
    Writer().error("boom", Stage.SELECTION), Writer().heartbeat(),
])
def test_every_frame_ends_with_a_blank_line(frame):
    assert frame.endswith(b"\n\n")
    assert not frame.endswith(b"\n\n\n")


def test_event_name_with_newlines_is_sanitised():
    frame = encode("prog\r\nevent: evil\nress", "x")
    assert frame.startswith(b"event: progevent: evilress\ndata: x\n")
    assert parse(frame) == [("progevent: evilress", "x")]


def test_comment_strips_newlines_and_is_ignored_by_clients():
    frame = comment("keep\ndata: injected\r")
    assert frame == b": keepdata: injected\n\n"
    assert parse(frame) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_refused_even_when_nested(bad):
    with pytest.raises(ValueError):
        encode_json("complete", {"stats": {"scores": [1.0, (2.0, bad)]}})
    with pytest.raises(ValueError):
        Writer().progress(Stage.CLUSTERING, 1.0, {"threshold": bad})


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan])
def test_progress_outside_unit_interval_refused(bad):
    writer = Writer()
    with pytest.raises(ValueError):
        writer.progress(Stage.EMBEDDING, bad)
    assert writer.frames_written == 0


def test_progress_bounds_are_inclusive():
    writer = Writer()
    assert parse_json(writer.progress(Stage.EMBEDDING, 0.0))[1]["progress"] == 0.0
    assert parse_json(writer.progress(Stage.EMBEDDING, 1.0))[1]["progress"] == 1.0
