"""Shared fixtures: a tiny tokenizer/backbone for model tests and a private MovieLens cache."""
from __future__ import annotations

import importlib.util

import pytest

TITLES = [
    "Toy Story (1995)", "Heat (1995)", "Star Wars (1977)", "Fargo (1996)", "Alien (1979)",
    "The Godfather (1972)", "Babe (1995)", "Casino (1995)", "Sense and Sensibility (1995)",
    "Twelve Monkeys (1995)", "Jumanji (1995)", "Get Shorty (1995)",
]

HAVE_RECBOLE = importlib.util.find_spec("recbole") is not None


@pytest.fixture(scope="session")
def titles() -> list[str]:
    return list(TITLES)


@pytest.fixture(scope="session")
def ml_cache_root(tmp_path_factory):
    """One LATENTR3_CACHE for the session, so MovieLens is prepared at most once."""
    return tmp_path_factory.mktemp("latentr3_cache")


@pytest.fixture
def ml_cache(ml_cache_root, monkeypatch):
    """Points LATENTR3_CACHE at the session's private cache for one test (skips without recbole)."""
    if not HAVE_RECBOLE:
        pytest.skip("the embedded MovieLens-100K needs recbole (pip install --no-deps recbole==1.2.1)")
    monkeypatch.setenv("LATENTR3_CACHE", str(ml_cache_root))
    return ml_cache_root
