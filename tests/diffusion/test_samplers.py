"""Samplers: the exact Gaussian flow lands on the target law; CFG mechanics; grid, NFE and labels."""

from __future__ import annotations

import math

import pytest
import torch

from manifold_lab.diffusion.samplers import (SamplerConfig, balanced_labels, evaluation_times, guided_velocity, nfe,
                                             sample, time_grid)
from manifold_lab.diffusion.transport import time_shift
from manifold_lab.errors import ConfigError, ManifoldLabError

# --------------------------------------------------------------------------------- the Gaussian target
MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
_A = torch.tensor([[1.2, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.4, 0.5, 0.5]], dtype=torch.float64)
SIGMA = _A @ _A.T  # full covariance, eigenvalues spread over ~0.1 .. 2.3


class GaussianVelocity:
    """The exact velocity of the linear path for x0 ~ N(MU, SIGMA), eps ~ N(0, I).

    (x_t, v) are jointly Gaussian: E[x_t] = (1-t) MU, Cov(x_t) = (1-t)^2 SIGMA + t^2 I,
    E[v] = -MU, Cov(v, x_t) = t I - (1-t) SIGMA, so E[v | x_t = x] = -MU + C S^-1 (x - (1-t) MU).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        self.calls.append((x.shape[0], float(t[0])))
        s = float(t[0])
        eye = torch.eye(3, dtype=torch.float64)
        cov = (1 - s) ** 2 * SIGMA + s**2 * eye
        cross = s * eye - (1 - s) * SIGMA
        gain = torch.linalg.solve(cov, cross.T).T  # cross @ cov^-1 (cov symmetric)
        return -MU + (x - (1 - s) * MU) @ gain.T


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


def _affine_probe(cfg: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic samplers are affine maps z -> A z + b on this target: read (b, A A^T) exactly."""
    probes = torch.cat([torch.zeros(1, 3), torch.eye(3)]).double()
    out = sample(GaussianVelocity(), probes, None, cfg, num_classes=1)
    b = out[0]
    a = (out[1:] - b).T  # columns = images of the basis vectors
    return b, a @ a.T


N_SAMPLES = 20000


@pytest.fixture(scope="module")
def gaussian_noise() -> torch.Tensor:
    return torch.randn(N_SAMPLES, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _assert_law(x, mean_tol, cov_tol):
    m, c = _moments(x)
    assert torch.allclose(m, MU, atol=mean_tol), (m, MU)
    assert torch.allclose(c, SIGMA, atol=cov_tol), (c, SIGMA)


@pytest.mark.parametrize("method,steps,shift,cov_tol", [("euler", 200, 1.0, 0.03), ("euler", 200, 3.0, 0.04),
                                                        ("heun", 20, 1.0, 0.01), ("heun", 50, 3.0, 0.01)])
def test_ode_samplers_land_on_the_gaussian(gaussian_noise, method, steps, shift, cov_tol):
    cfg = SamplerConfig(method=method, steps=steps, shift=shift)
    # exact read-out of the affine map (no sampling noise): discretisation error only. The mean follows
    # a linear ODE solution that every one-step method reproduces exactly; the covariance carries the error.
    b, cov = _affine_probe(cfg)
    assert torch.allclose(b, MU, atol=1e-9), b
    assert torch.allclose(cov, SIGMA, atol=cov_tol), cov
    # and the sample statistics, within the 20k-sample error (~0.01 on the mean, ~0.03 on the covariance)
    _assert_law(sample(GaussianVelocity(), gaussian_noise, None, cfg, num_classes=1), 0.04, 0.08)


def _cov_error(method: str, steps: int) -> float:
    return (_affine_probe(SamplerConfig(method=method, steps=steps))[1] - SIGMA).abs().max().item()


def test_convergence_orders():
    """Halving the step: Euler's error halves (first order), Heun's quarters (second order)."""
    euler = _cov_error("euler", 50) / _cov_error("euler", 100)
    heun = _cov_error("heun", 50) / _cov_error("heun", 100)
    assert 1.7 < euler < 2.3
    assert 3.3 < heun < 4.7
    assert _cov_error("heun", 10) < 0.3 * _cov_error("euler", 10)


def test_t_min_grid_still_lands_on_the_gaussian():
    cfg = SamplerConfig(method="heun", steps=30, t_min=0.02, shift=2.0)
    grid = time_grid(cfg)
    assert grid[cfg.steps - 1].item() == pytest.approx(0.02) and grid[-1] == 0 and grid[0] == 1
    b, cov = _affine_probe(cfg)
    assert torch.allclose(b, MU, atol=0.02) and torch.allclose(cov, SIGMA, atol=0.05)


@pytest.mark.parametrize("diffusion,last_step", [("sigma", "mean"), ("sigma", "euler"),
                                                 ("increasing-decreasing", "mean")])
def test_euler_maruyama_lands_on_the_gaussian(gaussian_noise, diffusion, last_step):
    cfg = SamplerConfig(method="euler_maruyama", steps=250, sde_diffusion=diffusion, last_step=last_step)
    x = sample(GaussianVelocity(), gaussian_noise, None, cfg, num_classes=1,
               generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all()
    _assert_law(x, 0.04, 0.1)


def test_euler_maruyama_is_stochastic_and_seeded():
    cfg = SamplerConfig(method="euler_maruyama", steps=20)
    noise = torch.zeros(4, 3, dtype=torch.float64)
    a = sample(GaussianVelocity(), noise, None, cfg, 1, generator=torch.Generator().manual_seed(3))
    b = sample(GaussianVelocity(), noise, None, cfg, 1, generator=torch.Generator().manual_seed(3))
    c = sample(GaussianVelocity(), noise, None, cfg, 1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # same start, different paths
    ode = sample(GaussianVelocity(), noise, None, SamplerConfig(method="euler_maruyama", steps=20,
                                                                  sde_diffusion="none"), 1)
    assert torch.allclose(ode, sample(GaussianVelocity(), noise, None, SamplerConfig(steps=20), 1))


def test_endpoints_are_finite_for_a_velocity_with_t_in_denominators():
    """A model that divides by t would NaN at t = 0: no sampler evaluates there; t = 1 is handled."""
    def model(x, t, y):
        assert torch.all(t > 0) and torch.all(t <= 1)
        return x / t.view(-1, 1)
    noise = torch.randn(6, 3)
    for method in ("euler", "heun", "euler_maruyama"):
        out = sample(model, noise, None, SamplerConfig(method=method, steps=8), 1)
        assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------- CFG
class ToyConditional:
    """v = x + (y + 1) * (c + 1) on channel c: conditional and null outputs differ on every channel."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        ch = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1, 1)
        return x + (y.to(x.dtype) + 1).view(-1, 1, 1, 1) * ch


def test_guided_velocity_on_every_channel_and_in_one_forward():
    model = ToyConditional()
    x = torch.randn(3, 5, 2, 2)
    y = torch.tensor([0, 1, 2])
    null = 10
    v = guided_velocity(model, x, 0.5, y, 4.0, (0.0, 0.8), null)
    assert model.batches == [6]  # one forward on [x, x]
    v_c = ToyConditional()(x, None, y)
    v_u = ToyConditional()(x, None, torch.full_like(y, null))
    assert torch.allclose(v, v_u + 4.0 * (v_c - v_u))
    assert ((v - v_c).abs().amax(dim=(0, 2, 3)) > 1e-3).all()  # every channel is guided
    assert ((v - v_c).abs() > 1e-3).all()
    # outside the interval: the conditional velocity, one plain forward
    model.batches.clear()
    assert torch.allclose(guided_velocity(model, x, 0.9, y, 4.0, (0.0, 0.8), null), v_c)
    assert model.batches == [3]
    # cfg_scale = 1: no unconditional branch
    model.batches.clear()
    assert torch.allclose(guided_velocity(model, x, 0.5, y, 1.0, (0.0, 1.0), null), v_c)
    assert model.batches == [3]
    # per-sample times: guided where inside, conditional where outside, still one forward
    model.batches.clear()
    t = torch.tensor([0.5, 0.95, 0.1])
    v = guided_velocity(model, x, t, y, 4.0, (0.0, 0.8), null)
    assert model.batches == [6]
    assert torch.allclose(v[[0, 2]], (v_u + 4.0 * (v_c - v_u))[[0, 2]]) and torch.allclose(v[1], v_c[1])
    with pytest.raises(ManifoldLabError, match="labels"):
        guided_velocity(model, x, 0.5, None, 4.0, (0.0, 1.0), null)


@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_sample_counts_forwards_and_matches_nfe(method):
    x = torch.randn(2, 3, 2, 2)
    y = torch.tensor([0, 1])
    plain = SamplerConfig(method=method, steps=6, shift=2.0)
    model = ToyConditional()
    sample(model, x, y, plain, num_classes=5, generator=torch.Generator().manual_seed(0))
    assert model.batches == [2] * len(model.batches)  # one forward per evaluation, no doubling
    assert len(model.batches) == nfe(plain) == (11 if method == "heun" else 6)
    guided = SamplerConfig(method=method, steps=6, shift=2.0, cfg_scale=3.0, cfg_interval=(0.0, 0.7))
    model = ToyConditional()
    seen = []
    sample(model, x, y, guided, num_classes=5, generator=torch.Generator().manual_seed(0),
           progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(1, 7)]
    times = evaluation_times(guided)
    assert [b for b in model.batches] == [4 if t <= 0.7 else 2 for t in times]
    assert 4 in model.batches and 2 in model.batches
    assert sum(model.batches) // 2 == nfe(guided)


def test_time_grid_and_auto_shift():
    grid = time_grid(SamplerConfig(steps=4))
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    auto = time_grid(SamplerConfig(steps=4, shift="auto"), (768, 16, 16))
    s = math.sqrt(48)
    assert torch.allclose(auto, time_shift(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64), s))
    # sample() takes the shape from the noise when latent_shape is not given
    calls = []
    sample(lambda x, t, y: calls.append(float(t[0])) or torch.zeros_like(x), torch.zeros(1, 768, 16, 16), None,
           SamplerConfig(steps=4, shift="auto"), 1)
    assert calls == pytest.approx(auto[:-1].tolist())


@pytest.mark.parametrize("bad", [dict(method="dpm"), dict(steps=0), dict(cfg_scale=-1.0), dict(cfg_interval=(0.5, 0.2)),
                                 dict(cfg_interval=(0.0, 1.5)), dict(shift=0.9), dict(sde_diffusion="SBDM"),
                                 dict(last_step="tweedie"), dict(t_min=1.0), dict(t_min=0.1, steps=1)])
def test_sampler_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError) as err:
        SamplerConfig(**bad)
    assert "\n" not in str(err.value)


def test_sampler_config_accepts_list_interval():
    assert SamplerConfig(cfg_interval=[0, 0.89]).cfg_interval == (0.0, 0.89)


# ------------------------------------------------------------------------------------------------ labels
def test_balanced_labels():
    y = balanced_labels(1000, 10, seed=3)
    assert y.dtype == torch.long and y.shape == (1000,)
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    assert torch.equal(y, balanced_labels(1000, 10, seed=3))
    assert not torch.equal(y, balanced_labels(1000, 10, seed=4))
    assert not torch.equal(y, torch.arange(1000) % 10)  # shuffled
    uneven = balanced_labels(23, 5)
    assert torch.bincount(uneven, minlength=5).tolist() == [5, 5, 5, 4, 4]
    with pytest.raises(ManifoldLabError, match="n >= num_classes"):
        balanced_labels(3, 10)
    with pytest.raises(ManifoldLabError):
        balanced_labels(10, 0)
