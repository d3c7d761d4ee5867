"""Shared tiny configurations: every tokenizer test runs in seconds on a shared 2-core CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from manifold_lab.tokenizers import VAE

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_helpers import tiny_config  # noqa: E402


@pytest.fixture
def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(tiny_config()).eval()


@pytest.fixture
def images() -> torch.Tensor:
    """Smooth structured images in [-1, 1] (upsampled random 4x4 patterns), fixed seed."""
    g = torch.Generator().manual_seed(1)
    low = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=16, mode="bilinear", align_corners=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for these tiny models: on a CPU shared with other jobs, OpenMP threads
    spinning against each other make small convolutions many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
