"""The page's routes through Flask's test client: content negotiation at `/`, the files,
their headers, and that they ship with the package and name no other origin."""

from __future__ import annotations

import configparser
import re

import pytest

from app.page import ASSETS

from .support import ROOT

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
PAGE_FILES = ["index.html", *ASSETS]


@pytest.mark.parametrize("accept", [BROWSER_ACCEPT, "text/html", "application/json;q=0.5, text/html"])
def test_a_browser_gets_the_page_at_the_root(client, accept):
    response = client.get("/", headers={"Accept": accept})
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert b'<label for="chunks">Chunks</label>' in response.data
    assert response.headers["Vary"] == "Accept"
    assert response.data == client.get("/playground").data


@pytest.mark.parametrize(
    "accept", [None, "*/*", "application/json", "text/*", "text/html;q=0.1, application/json", "text/html;q=0"]
)
def test_every_other_client_gets_the_json_index(client, accept):
    response = client.get("/", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert list(response.get_json()) == ["name", "version", "endpoints"]
    assert response.headers["Vary"] == "Accept"


def test_the_page_and_its_files(client):
    page = client.get("/playground")
    assert page.status_code == 200 and page.mimetype == "text/html"
    for name, (mimetype, _) in ASSETS.items():
        response = client.get(f"/playground/{name}")
        assert response.status_code == 200 and response.mimetype == mimetype, name
        assert response.data == (ROOT / "app" / "page" / name).read_bytes()
    sources = page.data + client.get("/playground/page.js").data
    scripts = re.findall(rb'(?:src=|from )"(?:\./|playground/)([\w.]+\.js)"', sources)
    assert {s.decode() for s in scripts} == {name for name in ASSETS if name.endswith(".js")}


@pytest.mark.parametrize("path", ["/playground", "/playground/page.js", "/"])
def test_page_responses_allow_nothing_but_this_server(client, path):
    response = client.get(path, headers={"Accept": "text/html"})
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    for directive in ("script-src", "style-src", "connect-src"):
        assert f"{directive} 'self';" in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("path", ["/playground/", "/playground/nope.js", "/playground/../api.py"])
def test_unknown_page_files_are_json_404s(client, path):
    response = client.get(path)
    assert response.status_code == 404 and response.get_json() == {"error": "not found"}


def test_page_files_ship_with_the_package():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "page/*" in setup["options.package_data"]["app"].split()
    assert sorted(p.name for p in (ROOT / "app" / "page").iterdir()) == sorted(PAGE_FILES)


def test_page_files_name_no_other_origin():
    """No CDN, no web font, no absolute URL (the SVG namespace is a name, not a request)."""
    for name in PAGE_FILES:
        text = (ROOT / "app" / "page" / name).read_text()
        text = text.replace('"http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?:|//[\w.-]+\.\w+/|@import|(?<![\w.])url\(", text), name
