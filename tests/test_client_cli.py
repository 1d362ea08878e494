"""`distill dedupe`, the client's command line, run as a process against a real gunicorn."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .client_support import REACT
from .support import Server, free_port

pytestmark = pytest.mark.e2e

KEY = "cli-test-key"
DISTILL = shutil.which("distill", path=str(Path(sys.executable).parent)) or "distill"
PARAGRAPHS = """React is a JavaScript library for building user interfaces.

React.js is a JS library for building UIs.
  \t
Vue is a progressive JavaScript framework.
"""


@pytest.fixture(scope="module")
def server():
    running = Server(WEB_CONCURRENCY="1", DISTILL_API_KEYS=KEY).start()
    yield running
    running.stop()


@pytest.fixture
def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def distill(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DISTILL, "dedupe", *args], input=stdin, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DISTILL_API_KEY": "", **(env or {})})


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_paragraphs_in_kept_chunks_out_as_json_lines(url, tmp_path):
    source = tmp_path / "chunks.txt"
    source.write_text(PARAGRAPHS)
    done = distill(str(source), "--url", url, "--api-key", KEY)
    assert (done.returncode, done.stderr) == (0, "")
    assert lines(done.stdout) == [
        {"id": "1", "text": "React is a JavaScript library for building user interfaces.", "cluster_id": 0},
        {"id": "3", "text": "Vue is a progressive JavaScript framework.", "cluster_id": 1},
    ]


def test_json_lines_keep_every_field_of_the_kept_objects(url):
    rows = [{**chunk, "source": f"doc-{chunk['id']}"} for chunk in REACT]
    done = distill("-", "--url", url, stdin="\n".join(json.dumps(r) for r in rows) + "\n",
                   env={"DISTILL_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout) == [{**rows[i], "cluster_id": c} for i, c in ((0, 0), (2, 1), (3, 2), (4, 3))]


def test_a_json_array_and_a_request_body_are_read_too(url):
    array = distill("--url", url, "--api-key", KEY, stdin=json.dumps([c["text"] for c in REACT]))
    assert [row["id"] for row in lines(array.stdout)] == ["1", "3", "4", "5"]
    body = distill("--url", url, "--api-key", KEY, stdin=json.dumps({"chunks": REACT}, indent=2))
    assert [row["id"] for row in lines(body.stdout)] == ["1", "3", "4", "5"]


def test_threshold_and_target_k_reach_the_service(url):
    stdin = json.dumps(REACT[:3])
    merged = distill("--url", url, "--api-key", KEY, "--threshold", "2", stdin=stdin)
    assert [row["id"] for row in lines(merged.stdout)] == ["1"]
    top = distill("--url", url, "--api-key", KEY, "--target-k", "1", stdin=json.dumps(REACT))
    assert len(lines(top.stdout)) == 1


@pytest.mark.parametrize("args, stdin, message", [
    (["--threshold", "5"], json.dumps(REACT), "distill: threshold must be between 0 and 2, got 5.0"),
    ([], '{"text": "a"}\nnot json\n', "distill: line 2 is not valid JSON"),
    ([], "  \n\n ", "distill: the input holds no chunks"),
    (["/no/such/file"], "", "distill: cannot read /no/such/file: No such file or directory"),
])
def test_an_error_is_one_line_on_stderr_and_a_non_zero_exit(url, args, stdin, message):
    done = distill(*args, "--url", url, "--api-key", KEY, stdin=stdin)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message)


def test_auth_and_connection_errors(url):
    refused = distill("--url", url, "--api-key", "wrong", stdin=json.dumps(REACT))
    assert (refused.returncode, refused.stderr) == (1, "distill: Invalid API key\n")
    port = free_port()
    unreachable = distill("--url", f"http://127.0.0.1:{port}", stdin=json.dumps(REACT))
    assert unreachable.returncode == 1 and unreachable.stderr.startswith(f"distill: cannot reach http://127.0.0.1:{port}")
    usage = distill("--target-k", "many")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1


def run_with_stderr_on_a_terminal(args: list[str], stdin: str) -> tuple[str, str]:
    """Run the command with stderr on a pseudo-terminal; return (stdout, what the terminal showed)."""
    terminal, stderr = pty.openpty()
    process = subprocess.Popen([DISTILL, "dedupe", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=stderr)
    os.close(stderr)
    process.stdin.write(stdin.encode())
    process.stdin.close()
    shown = b""
    while True:  # read while it runs, so a full terminal buffer never blocks it
        try:
            data = os.read(terminal, 65536)
        except OSError:  # EIO: the process closed its side and everything was read
            break
        if not data:
            break
        shown += data
    os.close(terminal)
    stdout = process.stdout.read()
    assert process.wait(timeout=120) == 0
    return stdout.decode(), shown.decode()


def test_progress_bars_only_when_stderr_is_a_terminal(url):
    args, stdin = ["--url", url, "--api-key", KEY, "--target-k", "3"], json.dumps(REACT)
    stdout, shown = run_with_stderr_on_a_terminal(args, stdin)
    for stage in ("embedding", "clustering", "selection", "mmr"):
        assert f"{stage:<10} 100%" in shown
    assert "embedded=5" in shown
    plain = distill(*args, stdin=stdin)
    assert plain.stderr == "" and plain.stdout == stdout  # same answer, no bars
