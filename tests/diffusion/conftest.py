"""Shared fixtures for the diffusion tests: a tiny saved tokenizer and its latent cache (seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from manifold_lab.tokenizers import VAE, VAEConfig


def tiny_tokenizer() -> VAE:
    """16x16 images -> 4x8x8 latents with random (untrained) weights and non-trivial latent stats."""
    torch.manual_seed(0)
    cfg = VAEConfig(image_size=16, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=4)
    return VAE(cfg).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "tiny-vae"
    tiny_tokenizer().save(folder)
    return folder


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every diffusion test runs with one torch thread (tests/conftest.py)."""
    yield
