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


@pytest.fixture(autouse=True)
def own_cache_directory(tmp_path_factory, monkeypatch):
    """Each test its own XDG cache directory, so the default disk store of an app or a
    server it starts holds nothing another test embedded (a test may need the model to
    work). Servers shared by a module's tests start before this: they use the run's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))


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
