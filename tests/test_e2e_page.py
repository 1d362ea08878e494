"""The page in a real browser (Debian's Chromium, headless, driven by Playwright) against a
real gunicorn: every request the page makes is routed, and one that leaves the origin
fails the test.

Needs /usr/bin/chromium (`apt-get install -y chromium`); without it these tests are
skipped, unless CI is set, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from urllib.parse import urlsplit

import pytest

from .support import FIVE, ROOT, Server, SSEParser, synthetic_texts

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / ".artifacts"
API_KEY = "page-test-key"
WAIT_MS = 90_000  # the first request loads the model in the worker

# Records, before the page's own script runs, each progress bar's value as it is set and
# the moment the chunk list is filled: live progress comes before the result.
RECORD_MUTATIONS = """
window.__mutations = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (r.type === "attributes" && r.target.tagName === "PROGRESS") {
      // How many streams the browser had received in full at this moment.
      const done = performance.getEntriesByType("resource").filter((e) => e.name.endsWith("/v1/dedupe/stream"));
      window.__mutations.push([r.target.id.replace("stage-", ""), r.target.value, done.length]);
    } else if (r.type === "childList" && r.target.id === "chunk-list" && r.addedNodes.length) {
      window.__mutations.push(["chunks", r.addedNodes.length]);
    }
  }
}).observe(document, { subtree: true, childList: true, attributes: true, attributeFilter: ["value"] });
"""

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    server = Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_server():
    server = Server(DISTILL_API_KEYS=f"other-key,{API_KEY}").start()
    yield server
    server.stop()


class Visit:
    """One browser context on one server: every request is checked against the origin."""

    def __init__(self, browser, server: Server):
        self.origin = f"http://127.0.0.1:{server.port}"
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.elsewhere: list[str] = []
        self.api_calls: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.add_init_script(RECORD_MUTATIONS)

    def _route(self, route):
        url = route.request.url
        parts = urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.elsewhere.append(url)
            route.abort()
            return
        if parts.path.startswith("/v1/"):
            self.api_calls.append(parts.path)
        route.continue_()

    def open(self, path: str = "/"):
        self.page.goto(self.origin + path)
        return self.page

    def run(self, text: str, threshold: str = "", api_key: str = ""):
        page = self.page
        page.get_by_label("Chunks", exact=True).fill(text)
        page.get_by_label("Threshold", exact=True).fill(threshold)
        page.get_by_label("API key", exact=True).fill(api_key)
        page.get_by_role("button", name="De-duplicate").click()

    def wait_for_result(self):
        self.page.locator("#result").wait_for(state="visible", timeout=WAIT_MS)

    def alert(self):
        alert = self.page.get_by_role("alert")
        alert.filter(has_text=re.compile(".")).wait_for(timeout=WAIT_MS)
        return alert.inner_text()

    def close(self):
        self.context.close()
        assert self.elsewhere == [], "requests left the origin"
        assert self.errors == [], "uncaught errors in the page"


@pytest.fixture
def visit(browser, server):
    visit = Visit(browser, server)
    yield visit
    visit.close()


def stream_result(server: Server, body: dict, headers: dict | None = None) -> dict:
    """The `complete` event of the stream for `body`, straight from the API."""
    conn = server.connection()
    conn.request("POST", "/v1/dedupe/stream", json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    parser = SSEParser()
    parser.feed(conn.getresponse().read().decode())
    conn.close()
    assert parser.events[-1].type == "complete"
    return parser.events[-1].json


# What a person must never read on the page: a value the script failed to format.
RAW_VALUES = ("[object Object]", "undefined", "NaN")
ALL_TEXT = """
() => [document.body.innerText, document.body.textContent,
       ...[...document.querySelectorAll("[title], [aria-label], [alt]")].flatMap(
         (el) => ["title", "aria-label", "alt"].map((name) => el.getAttribute(name) || ""))].join("\\n")
"""


def assert_legible(page) -> None:
    """Nothing on the page, visible text, SVG titles and labels included, is a raw value."""
    text = page.evaluate(ALL_TEXT)
    assert [raw for raw in RAW_VALUES if raw in text] == [], text


def five_body() -> dict:
    return {"chunks": [{"id": str(i + 1), "text": t} for i, t in enumerate(FIVE)], "explain": True}


# --------------------------------------------------------------------------- the main flow


def test_five_chunks_live_progress_duplicate_guard_and_map(visit, server):
    page = visit.open("/")
    visit.run("\n\n".join(FIVE))
    visit.wait_for_result()

    # Live progress: one bar per stage, named by the stage, set from 0 to 1 before the result.
    mutations = page.evaluate("window.__mutations")
    shown = [m[0] for m in mutations].index("chunks")
    for stage in ("embedding", "clustering", "selection"):
        values = [m[1] for m in mutations[:shown] if m[0] == stage]
        assert values[0] == 0 and values[-1] == 1, (stage, mutations)
        bar = page.get_by_role("progressbar", name=stage, exact=True)
        assert bar.evaluate("bar => bar.value") == 1
    assert page.get_by_role("progressbar").count() == 3  # no mmr: target_k is 0

    # Every chunk once; the duplicate names what it merged into and the distance ("An air
    # plane ..." says all "A plane ..." says, and more: it is the one kept).
    expected = stream_result(server, five_body())["explain"]
    items = page.locator("[data-chunk-id]:not(circle)")
    assert items.evaluate_all("items => items.map(i => [i.dataset.chunkId, i.dataset.state])") == [
        ["1", "dropped"], ["2", "kept"], ["3", "kept"], ["4", "kept"], ["5", "kept"],
    ]
    distance = expected["chunks"][0]["distance"]
    assert 0 < distance < 0.2
    assert f"Merged into chunk 2 at cosine distance {distance}." in page.locator('li[data-chunk-id="1"]').inner_text()

    # The number guard's pair, told on both chunks.
    assert expected["guarded_pairs"] == [{"a": 3, "b": 4, "guard": "numbers"}]
    assert "numbers guard held it apart from chunk 5" in page.locator('li[data-chunk-id="4"]').inner_text()
    assert "numbers guard held it apart from chunk 4" in page.locator('li[data-chunk-id="5"]').inner_text()

    # The map: one circle per chunk where explain put it, coloured by cluster, kept ones ringed.
    chart = page.get_by_role("img", name=re.compile("map", re.IGNORECASE))
    circles = chart.locator("circle").evaluate_all(
        "cs => cs.map(c => [c.dataset.chunkId, c.getAttribute('fill'), c.getAttribute('class'),"
        " Number(c.getAttribute('cx')), -Number(c.getAttribute('cy'))])"
    )
    by_id = {chunk_id: (fill, kind, [x, y]) for chunk_id, fill, kind, x, y in circles}
    assert len(circles) == 5 and set(by_id) == {"1", "2", "3", "4", "5"}
    for row, point in zip(expected["chunks"], expected["map"]):
        assert by_id[row["id"]][2] == pytest.approx(point)
    assert by_id["1"][0] == by_id["2"][0] != by_id["3"][0]
    assert [by_id[i][1] for i in "12345"] == ["dropped", "kept", "kept", "kept", "kept"]
    assert page.locator("#summary").inner_text().startswith("5 chunks in, 4 kept (19% fewer) in 4 clusters")

    # Every stage's stats in words: the guard counts too ({"numbers": 1, "coverage": 0}).
    clustering = page.locator("#stage-clustering-stats").inner_text()
    assert "guarded by: numbers 1 ·" in clustering and "guarded pairs: 1" in clustering
    assert page.locator("#stage-embedding-stats").inner_text().startswith("embedded: 5 · windows: 5 · tokens: ")
    assert_legible(page)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)


def test_bars_fill_while_the_stream_is_still_arriving(visit):
    """400 texts take the model about a second: the embedding bar moves through fractions
    before the browser has received the whole response (resource timing lists a fetch
    only once its body is complete)."""
    page = visit.open("/")
    visit.run("\n\n".join(synthetic_texts(400, seed=17)))
    visit.wait_for_result()
    embedding = [m for m in page.evaluate("window.__mutations") if m[0] == "embedding"]
    assert any(0 < value < 1 for _, value, _ in embedding), embedding
    assert embedding[0][2] == 0, "the first progress was shown only after the whole stream arrived"
    assert page.locator("li[data-chunk-id]").count() == 400


def test_the_playground_path_serves_the_same_page(visit):
    page = visit.open("/playground")
    assert page.title() == "Distill: de-duplicate chunks"
    for label in ("Chunks", "Threshold", "API key"):
        assert page.get_by_label(label, exact=True).count() == 1
    assert page.get_by_role("button", name="De-duplicate").is_enabled()


def test_keyboard_alone_runs_it(visit):
    page = visit.open("/")
    page.get_by_label("Chunks", exact=True).focus()
    page.keyboard.type("Cats purr.\n\nDogs bark.")
    order = []
    for _ in range(3):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["threshold", "api-key", "run"]
    page.keyboard.press("Enter")
    visit.wait_for_result()
    assert page.locator('li[data-state="kept"]').count() == 2
    page.get_by_label("Chunks", exact=True).focus()
    page.keyboard.press("Control+Enter")  # runs again from the text area
    page.wait_for_function("() => window.__mutations.filter(m => m[0] === 'chunks').length === 2", timeout=WAIT_MS)


def test_a_json_body_with_mmr_shows_the_mmr_stage_and_rows(visit):
    page = visit.open("/")
    body = {
        "chunks": [{"id": f"c{i}", "text": t, "score": 1 - i / 10} for i, t in enumerate(FIVE)],
        "target_k": 2,
    }
    visit.run(json.dumps(body, indent=2), threshold="0.3")
    visit.wait_for_result()
    assert page.get_by_role("progressbar", name="mmr", exact=True).evaluate("bar => bar.value") == 1
    states = page.locator("li[data-chunk-id]").evaluate_all("items => items.map(i => i.dataset.state)")
    assert states.count("kept") == 2 and len(states) == 5
    assert "left out by MMR" in page.locator("#chunk-list").inner_text()
    assert "threshold 0.3" in page.locator("#summary").inner_text()
    assert_legible(page)


def test_a_frozen_prefix_and_vectors_only_are_legible_too(visit):
    """Chunks with no text (their own vectors), a frozen cache prefix (no vector, off the map),
    MMR and both guards asked for: every stat and row still reads as words and numbers."""
    page = visit.open("/")
    vectors = [[1, 0, 0], [0.99, 0.14, 0], [0, 1, 0], [0, 0, 1]]
    body = {
        "chunks": [{"id": "system", "text": "You answer from the documents below.", "cache_control": True}]
        + [{"id": f"v{i}", "embedding": v, "score": 1 - i / 10} for i, v in enumerate(vectors)],
        "options": {"preserve_cache_prefix": True},
        "guards": ["numbers", "coverage"],
        "target_k": 2,
    }
    visit.run(json.dumps(body))
    visit.wait_for_result()
    states = page.locator("li[data-chunk-id]").evaluate_all("items => items.map(i => i.dataset.state)")
    assert states == ["kept", "kept", "dropped", "kept", "dropped"]
    assert "Merged into chunk v0 at cosine distance 0.0" in page.locator('li[data-chunk-id="v1"]').inner_text()
    assert "left out by MMR" in page.locator('li[data-chunk-id="v3"]').inner_text()
    assert "frozen cache prefix" in page.locator('li[data-chunk-id="system"]').inner_text()
    assert page.get_by_role("progressbar", name="embedding", exact=True).count() == 0
    assert_legible(page)


# --------------------------------------------------------------------------- errors


def test_a_wrong_or_missing_api_key_shows_the_servers_message(browser, auth_server):
    visit = Visit(browser, auth_server)
    try:
        visit.open("/")
        visit.run("Cats purr.\n\nDogs bark.", api_key="wrong-key")
        assert visit.alert() == "401 UNAUTHORIZED: Invalid API key"
        visit.run("Cats purr.\n\nDogs bark.")
        visit.page.get_by_role("alert").filter(has_text="required").wait_for(timeout=WAIT_MS)
        assert visit.alert() == "401 UNAUTHORIZED: Authorization header required"
        visit.run("Cats purr.\n\nDogs bark.", api_key=API_KEY)
        visit.wait_for_result()
        assert visit.page.get_by_role("alert").inner_text() == ""
    finally:
        visit.close()


def test_a_bad_threshold_shows_the_validation_error(visit):
    visit.open("/")
    visit.run("Cats purr.\n\nDogs bark.", threshold="3")
    assert visit.alert() == "400 BAD REQUEST: threshold must be between 0 and 2, got 3"
    assert visit.page.locator("#result").is_hidden()


def test_invalid_json_is_caught_before_sending(visit):
    visit.open("/")
    visit.run('{"chunks": [')
    assert visit.alert().startswith('Chunks: the text starts with "{" but is not valid JSON')
    assert visit.api_calls == []


# --------------------------------------------------------------------------- copy as curl


def test_copy_as_curl_is_the_request_that_was_sent(browser, auth_server):
    visit = Visit(browser, auth_server)
    visit.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=visit.origin)
    try:
        page = visit.open("/")
        visit.run("It's raining.\n\nIt is raining.", threshold="0.4", api_key=API_KEY)
        visit.wait_for_result()
        page.get_by_role("button", name="Copy as curl").click()
        page.get_by_role("status").filter(has_text="Copied to the clipboard.").wait_for()
        command = page.locator("#curl").inner_text()
        assert page.evaluate("navigator.clipboard.readText()") == command
        assert command.startswith(f"curl -N '{visit.origin}/v1/dedupe/stream' ")
        assert f"'Authorization: Bearer {API_KEY}'" in command
        ran = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, check=True)
        parser = SSEParser()
        parser.feed(ran.stdout)
        assert parser.events[-1].type == "complete"
        got = parser.events[-1].json
        sent = {
            "chunks": [{"id": "1", "text": "It's raining."}, {"id": "2", "text": "It is raining."}],
            "threshold": 0.4, "explain": True,
        }
        answer = stream_result(auth_server, sent, {"Authorization": f"Bearer {API_KEY}"})
        for result in (got, answer):
            result["stats"]["latency_ms"] = 0
        assert got == answer
    finally:
        visit.close()


# --------------------------------------------------------------------------- accessibility

CONTRAST = """
() => {
  const channel = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
  const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  const out = {};
  for (const sel of SELECTORS) {
    const el = document.querySelector(sel);
    const [a, b] = [luminance(rgb(getComputedStyle(el).color)), luminance(background(el))];
    out[sel] = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  }
  return out;
}
"""


def test_text_contrast_is_at_least_4_5(visit):
    page = visit.open("/")
    visit.run("Cats purr.\n\nCats purr!\n\nDogs bark.", threshold="3")
    visit.alert()
    visit.run("Cats purr.\n\nCats purr!\n\nDogs bark.")
    visit.wait_for_result()
    page.evaluate("document.getElementById('error').textContent = 'shown for the check'")
    selectors = [
        "body", "header p", ".help", "label", "#run", "#copy-curl", "#error", ".stage-stats",
        "#summary", ".badge.kept", ".badge.dropped", ".cluster", ".why", "li[data-state=dropped] .chunk-text",
        "figcaption", "#map .label",
    ]
    ratios = page.evaluate(CONTRAST.replace("SELECTORS", json.dumps(selectors)))
    low = {sel: round(ratio, 2) for sel, ratio in ratios.items() if ratio < 4.5}
    assert low == {}


# --------------------------------------------------------------------------- other clients


def test_curl_still_gets_json_at_the_root(server):
    url = f"http://127.0.0.1:{server.port}/"
    plain = subprocess.run(["curl", "-s", url], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(plain.stdout)["name"] == "distill"
    html = subprocess.run(["curl", "-s", "-H", "Accept: text/html", url], capture_output=True, text=True, timeout=30)
    assert html.stdout.startswith("<!doctype html>")
