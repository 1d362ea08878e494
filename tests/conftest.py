"""Shared fixtures: one real embedding model per test session, apps built from a Config."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from app import create_app
from app.config import Config
from pipeline.embed import FastEmbedModel


def pytest_configure(config):
    """The run's own cache directory: the embedding cache's default disk store (and any
    other program's XDG cache) goes there, not into the user's, and leaves with the run."""
    config.xdg_cache_home = tempfile.mkdtemp(prefix="distill-test-cache-")
    os.environ["XDG_CACHE_HOME"] = config.xdg_cache_home


def pytest_unconfigure(config):
    shutil.rmtree(config.xdg_cache_home, ignore_errors=True)


@pytest.fixture(scope="session")
def embedder() -> FastEmbedModel:
    """The real bundled model, loaded once for the whole run."""
    model = FastEmbedModel()
    model.dim()
    return model


@pytest.fixture
def make_app(embedder, tmp_path):
    """Build an app from Config fields, sharing the session's loaded model (its disk
    embedding store in the test's own directory unless the fields say otherwise)."""

    def build(**fields):
        return create_app(Config(**{"cache_dir": str(tmp_path / "cache"), **fields}), embedder=embedder)

    return build


@pytest.fixture
def client(make_app):
    return make_app().test_client()
