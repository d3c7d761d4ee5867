"""The VAE objective: known-answer KL, the perceptual term, and a few CPU steps that lower the loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from manifold_lab.tokenizers import VAE, vae_loss
from manifold_lab.tokenizers import vae as vae_module
from manifold_lab.tokenizers.vae import DiagonalGaussian

from conftest import tiny_config


def test_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1)
    assert torch.allclose(post.kl(), ref, atol=1e-5)
    standard = DiagonalGaussian(torch.zeros(2, 8, 3, 3))  # N(0, I) itself
    assert torch.equal(standard.kl(), torch.zeros(2))


def test_logvar_is_clamped() -> None:
    post = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], 1))
    assert post.logvar.item() == -30.0 and torch.isfinite(post.kl()).all()


class _MeanSquared(nn.Module):
    """A stand-in perceptual distance with a known value: per-image mean squared difference."""

    name = "mse-stand-in"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).pow(2).flatten(1).mean(1)


def test_loss_terms_and_weights(images, monkeypatch) -> None:
    torch.manual_seed(0)
    vae = VAE(tiny_config(perceptual_weight=0.5, perceptual_name="stand-in", kl_weight=1e-3))
    monkeypatch.setitem(vae_module._PERCEPTUAL_CACHE, ("stand-in", "cpu"), _MeanSquared())
    torch.manual_seed(5)
    loss, logs = vae_loss(vae, (images, torch.zeros(len(images))), step=0)
    torch.manual_seed(5)  # the same posterior sample
    with torch.no_grad():
        recon, post = vae(images)
    l1 = (recon - images).abs().mean()
    p = (recon - images).pow(2).flatten(1).mean(1).mean()
    kl = post.kl().mean() / images[0].numel()
    assert torch.allclose(loss, l1 + 0.5 * p + 1e-3 * kl, rtol=1e-5)
    assert float(logs["l1"]) == pytest.approx(float(l1), rel=1e-5)
    assert float(logs["perceptual"]) == pytest.approx(float(p), rel=1e-5)
    assert float(logs["kl"]) == pytest.approx(float(post.kl().mean()), rel=1e-4)
    # weight 0: the perceptual network is never built or used
    vae.config.perceptual_weight = 0.0
    _, logs0 = vae_loss(vae, images, step=0)
    assert "perceptual" not in logs0


def test_a_few_adamw_steps_lower_the_loss(images) -> None:
    torch.manual_seed(0)
    vae = VAE(tiny_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        torch.manual_seed(100 + step)
        loss, _ = vae_loss(vae, images, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
