"""Shared fixtures: one real embedding model per test session, apps built from a Config."""

from __future__ import annotations

import pytest

from app import create_app
from app.config import Config
from pipeline.embed import FastEmbedModel


@pytest.fixture(scope="session")
def embedder() -> FastEmbedModel:
    """The real bundled model, loaded once for the whole run."""
    model = FastEmbedModel()
    model.dim()
    return model


@pytest.fixture
def make_app(embedder):
    """Build an app from Config fields, sharing the session's loaded model."""

    def build(**fields):
        return create_app(Config(**fields), embedder=embedder)

    return build


@pytest.fixture
def client(make_app):
    return make_app().test_client()
