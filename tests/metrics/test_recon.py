"""PSNR / SSIM known values and the streaming reconstruction accumulator."""

import math

import numpy as np
import pytest
import torch

from manifold_lab.errors import ManifoldLabError
from manifold_lab.metrics import ReconAccumulator, psnr, ssim


@pytest.fixture
def x():
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.6 - 0.8


def test_psnr_of_a_constant_offset(x):
    # MSE = 0.1^2 = 0.01 with a data range of 2: 10 log10(4 / 0.01) = 26.0206 dB
    out = psnr(x, x + 0.1)
    assert out.shape == (6,)
    assert torch.allclose(out, torch.full((6,), 10 * math.log10(400.0), dtype=torch.float64), atol=1e-9)
    assert psnr(x.numpy(), (x + 0.1).numpy(), data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-9)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_identical_is_one_and_drops_with_noise(x):
    assert torch.allclose(ssim(x, x), torch.ones(6, dtype=torch.float64), atol=1e-6)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    s = ssim(x, noisy)
    assert (s < 0.9).all() and (s > -1).all()


def test_accumulator_streams_and_merges(x):
    rec = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    dist = (x - rec).abs().flatten(1).mean(1)
    whole, parts = ReconAccumulator(perceptual_name="l1"), ReconAccumulator(perceptual_name="l1")
    whole.update(x, rec, dist)
    parts.update(x[:2], rec[:2], lambda a, b: (a - b.clamp(-1, 1)).abs().flatten(1).mean(1))
    parts.update(x[2:], rec[2:], dist[2:, None])
    a, b = whole.compute(), parts.compute()
    for key in ("psnr", "ssim", "perceptual", "psnr_std"):
        assert a[key] == pytest.approx(b[key], rel=1e-9)
    assert a["psnr"] == pytest.approx(psnr(x, rec).mean().item())
    assert a["ssim"] == pytest.approx(ssim(x, rec).mean().item())
    assert a["perceptual"] == pytest.approx(dist.mean().item())
    assert (a["n"], a["n_perceptual"], a["perceptual_name"]) == (6, 6, "l1")


def test_accumulator_clamps_reconstructions(x):
    acc = ReconAccumulator()
    acc.update(x.clamp(-1, 1), torch.full_like(x, 5.0))
    expected = psnr(x, torch.ones_like(x)).mean().item()
    res = acc.compute()
    assert res["psnr"] == pytest.approx(expected) and res["perceptual"] is None


def test_bad_inputs(x):
    with pytest.raises(ManifoldLabError, match="shapes"):
        psnr(x, x[:, :2])
    with pytest.raises(ManifoldLabError, match=r"must be \(B,C,H,W\)"):
        ssim(x[0], x[0])
    with pytest.raises(ManifoldLabError, match="smaller than the 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    bad = x.clone()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ManifoldLabError, match="1 NaN/inf"):
        psnr(bad, x)
    with pytest.raises(ManifoldLabError, match="one value per image"):
        ReconAccumulator().update(x, x, torch.zeros(3))
