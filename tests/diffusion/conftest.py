"""Shared fixtures for the diffusion tests: a tiny saved tokenizer, one torch thread per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tests import diffusion_helpers and dit_workers
from diffusion_helpers import tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "tiny-vae"
    tiny_tokenizer().save(folder)
    return folder


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every diffusion test runs with one torch thread (tests/conftest.py)."""
    yield
