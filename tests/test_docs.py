"""The README's links into the docs (mkdocs --strict checks links between the docs' own
pages, `make docs`; nothing else checks the README's), and its length."""

from __future__ import annotations

import re

import pytest

from .support import ROOT

README = (ROOT / "README.md").read_text()
LOCAL_LINKS = sorted({target for target in re.findall(r"\]\(([^)\s]+)\)", README) if "://" not in target})


def test_the_readme_stays_a_front_page():
    assert len(README.splitlines()) <= 300


def test_the_readme_links_into_the_docs():
    assert {"docs/getting-started.md", "docs/api.md", "docs/configuration.md"} <= set(LOCAL_LINKS)


@pytest.mark.parametrize("target", LOCAL_LINKS)
def test_every_local_link_in_the_readme_exists(target):
    path, _, anchor = target.partition("#")
    assert (ROOT / path).exists(), target
    if anchor:
        headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
        assert anchor in slugs, target


@pytest.mark.parametrize("path", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_every_code_block_is_closed(path):
    """An unclosed fence swallows the rest of the page into one code block (MkDocs accepts it)."""
    text = (ROOT / path if path == "README.md" else ROOT / "docs" / path).read_text()
    assert len(re.findall(r"^```", text, re.M)) % 2 == 0
