"""The client's documented snippets (docs/client.md, and the README's three lines), run as
written against a real gunicorn."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .support import ROOT, Server

pytestmark = pytest.mark.e2e

DOCUMENTED_URL = "http://localhost:8080"


def fenced_blocks(path: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block in a Markdown file of the repository."""
    return re.findall(r"```(\w*)\n(.*?)```", (ROOT / path).read_text(), re.S)


BLOCKS = fenced_blocks("docs/client.md")
PYTHON = [code for language, code in BLOCKS if language == "python"]
README_PYTHON = [code for language, code in fenced_blocks("README.md") if language == "python"]


@pytest.fixture(scope="module")
def url():
    running = Server(WEB_CONCURRENCY="1").start()
    yield f"http://127.0.0.1:{running.port}"
    running.stop()


def test_the_page_has_a_snippet_per_framework():
    imports = " ".join(PYTHON)
    for module in ("distill_client import", "distill_client.langchain", "distill_client.llama_index",
                   "distill_client.haystack"):
        assert module in imports


@pytest.mark.parametrize("code", PYTHON + README_PYTHON,
                         ids=["client", "langchain", "llama_index", "haystack", "readme"])
def test_python_snippet_prints_what_its_last_comment_says(url, code):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(DOCUMENTED_URL, url), "snippet", "exec"), {})
    expected = code.rstrip().splitlines()[-1].split("  # ", 1)[1]
    assert printed.getvalue().splitlines()[-1] == expected


def test_command_line_snippet_prints_the_documented_lines(url, tmp_path):
    shell = next(code for language, code in BLOCKS if language == "sh" and "distill dedupe" in code)
    output = next(code for language, code in BLOCKS if language == "" and code.startswith('{"id"'))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(["bash", "-euc", shell.replace(DOCUMENTED_URL, url)], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PATH": path}, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == output
