"""The property tests of test_openapi.py over HTTP against a real gunicorn, with more examples.

Not collected by `make test` (the name does not start with `test_`): `make test-fuzz`.
Examples are random on each run; a failure prints how to reproduce it.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings

from app.openapi import served_document

from .support import Server
from .test_openapi import CHECKS, MAX_CHUNKS, property_schema

pytestmark = pytest.mark.e2e

http_schema = property_schema(MAX_CHUNKS)


@pytest.fixture(scope="module")
def server():
    running = Server(DISTILL_MAX_CHUNKS=str(MAX_CHUNKS)).start()
    yield running
    running.stop()


def test_server_serves_the_document_under_test(server):
    status, body = server.get("/openapi.json")
    assert status == 200 and json.loads(body) == served_document(MAX_CHUNKS)


@http_schema.parametrize()
@settings(max_examples=2000, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_over_http_conforms_to_the_document(case, server):
    case.call_and_validate(base_url=f"http://127.0.0.1:{server.port}", checks=CHECKS)
