"""Suite-wide set-up: every test (and every subprocess it starts) uses a private cache folder, so the
suite never reads or writes the user's ~/.cache/manifold-lab (default checkpoints, feature caches)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ["MANIFOLD_LAB_CACHE"] = tempfile.mkdtemp(prefix="manifold-lab-test-cache-")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def one_thread():
    """One intra-op torch thread for a test: on a CPU shared with other jobs, OpenMP threads spinning
    against each other make small kernels many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
