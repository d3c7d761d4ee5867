"""Flow-matching transport: time shift, training-time draws, the linear path and the velocity loss."""

from __future__ import annotations

import math

import pytest
import torch

from manifold_lab.diffusion.transport import (FlowMatchingLoss, TransportConfig, eps_from_velocity, interpolate,
                                              inverse_time_shift, resolve_shift, sample_t, shift_dim, time_shift,
                                              velocity_target, x0_from_velocity)
from manifold_lab.errors import ConfigError, ManifoldLabError


def test_time_shift_endpoints_monotone_and_inverse():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (1.0, 2.0, 6.9):
        st = time_shift(t, s)
        assert st[0] == 0 and st[-1] == 1
        assert torch.all(st[1:] > st[:-1])
        assert torch.allclose(inverse_time_shift(st, s), t, atol=1e-12)
        if s > 1:
            assert torch.all(st[1:-1] > t[1:-1])  # towards the noise end
        else:
            assert torch.equal(st, t)
    assert time_shift(0.5, 3.0) == pytest.approx(0.75)  # 1.5 / 2


def test_resolve_shift_auto_is_rae_rule():
    assert shift_dim((768, 16, 16)) == pytest.approx(math.sqrt(48))  # 6.928...
    assert resolve_shift("auto", (768, 16, 16)) == pytest.approx(6.9282, abs=1e-4)
    assert resolve_shift("auto", (768, 8, 8)) == pytest.approx(3.4641, abs=1e-4)
    assert resolve_shift("auto", (32, 16, 16), base=512) == pytest.approx(4.0)
    assert shift_dim((4, 16, 16)) == pytest.approx(0.5)
    assert resolve_shift("auto", (4, 16, 16)) == 1.0  # floored at 1
    assert resolve_shift(2, None) == 2.0
    with pytest.raises(ManifoldLabError, match="latent shape"):
        resolve_shift("auto", None)
    with pytest.raises(ConfigError):
        resolve_shift(0.5, (4, 8, 8))


@pytest.mark.parametrize("bad", [dict(t_sampling="beta"), dict(logit_std=0.0), dict(shift=0.5), dict(shift="big"),
                                 dict(shift=True), dict(cos_loss_weight=-1.0), dict(t_eps=1.0), dict(shift_base=0)])
def test_transport_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError) as err:
        TransportConfig(**bad)
    assert "\n" not in str(err.value)


def test_logit_normal_and_uniform_draws():
    g = torch.Generator().manual_seed(0)
    t = sample_t(20000, TransportConfig(), (4, 8, 8), generator=g)
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert 0 < t.min() and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)  # symmetric around 1/2 for m = 0
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    # logit-normal with mean m: median sigmoid(m); the shift maps the median through time_shift
    cfg = TransportConfig(logit_mean=-0.5, shift=3.0)
    t = sample_t(20000, cfg, None, generator=torch.Generator().manual_seed(1))
    expected = time_shift(1 / (1 + math.exp(0.5)), 3.0)
    assert t.median().item() == pytest.approx(expected, abs=0.01)
    u = sample_t(20000, TransportConfig(t_sampling="uniform"), None, generator=torch.Generator().manual_seed(2))
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.var().item() == pytest.approx(1 / 12, abs=0.003)
    # same generator seed -> same draws; t_eps clamps
    a = sample_t(8, TransportConfig(), None, generator=torch.Generator().manual_seed(3))
    b = sample_t(8, TransportConfig(), None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = sample_t(5000, TransportConfig(t_sampling="uniform", t_eps=0.2), None, generator=torch.Generator().manual_seed(4))
    assert c.min().item() == pytest.approx(0.2)


def test_path_identities():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.rand(5, generator=g)
    x_t = interpolate(x0, eps, t)
    v = velocity_target(x0, eps)
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - tb) * x0 + tb * eps)
    assert torch.allclose(x0_from_velocity(x_t, v, t), x0, atol=1e-6)
    assert torch.allclose(eps_from_velocity(x_t, v, t), eps, atol=1e-6)
    assert torch.equal(interpolate(x0, eps, 0.0), x0) and torch.equal(interpolate(x0, eps, 1.0), eps)
    # v is the time derivative of the path
    d = 1e-3
    fd = (interpolate(x0.double(), eps.double(), 0.4 + d) - interpolate(x0.double(), eps.double(), 0.4 - d)) / (2 * d)
    assert torch.allclose(fd, v.double(), atol=1e-8)
    with pytest.raises(ManifoldLabError):
        interpolate(x0, eps, torch.rand(4))


def _manual(cfg, x0, seed, pred_fn):
    """The loss computed by hand with the documented draw order (t, then eps)."""
    g = torch.Generator().manual_seed(seed)
    t = sample_t(x0.shape[0], cfg, tuple(x0.shape[1:]), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = interpolate(x0, eps, t)
    target = eps - x0
    pred = pred_fn(x_t, t)
    return t, target, pred, x_t


def test_loss_matches_manual_computation_and_quartile_logs():
    cfg = TransportConfig(t_sampling="uniform")
    x0 = torch.randn(64, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    model = lambda x, t, y: 0.5 * x + t.view(-1, 1, 1, 1)  # noqa: E731
    loss_fn = FlowMatchingLoss(cfg, (2, 3, 3))
    loss, logs = loss_fn(model, x0, None, generator=torch.Generator().manual_seed(7))
    t, target, pred, _ = _manual(cfg, x0, 7, lambda x, t: model(x, t, None))
    per = (pred - target).pow(2).flatten(1).mean(1)
    assert loss.ndim == 0 and loss.item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert logs["mse"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert "cos" not in logs
    q = (t * 4).long().clamp(0, 3)
    present = sorted(set(q.tolist()))
    assert sorted(k for k in logs if k.startswith("mse_t")) == [f"mse_t{i}" for i in present]
    for i in present:
        assert logs[f"mse_t{i}"].item() == pytest.approx(per[q == i].mean().item(), rel=1e-6)
    # gradients flow through the model
    w = torch.tensor(0.3, requires_grad=True)
    loss, _ = loss_fn(lambda x, t, y: w * x, x0, None, generator=torch.Generator().manual_seed(7))
    loss.backward()
    assert w.grad is not None and w.grad.abs() > 0


def test_loss_is_zero_for_the_exact_velocity():
    """x0 = 0 makes the target recoverable from x_t: v = eps = x_t / t."""
    x0 = torch.zeros(16, 3, 2, 2)
    loss, logs = FlowMatchingLoss(TransportConfig(), (3, 2, 2))(
        lambda x, t, y: x / t.view(-1, 1, 1, 1), x0, None, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10


def test_cosine_term_on_and_off():
    x0 = torch.randn(32, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    model = lambda x, t, y: -x  # noqa: E731
    off = FlowMatchingLoss(TransportConfig(), (4, 2, 2))
    on = FlowMatchingLoss(TransportConfig(cos_loss_weight=0.5), (4, 2, 2))
    loss_off, _ = off(model, x0, None, generator=torch.Generator().manual_seed(1))
    loss_on, logs = on(model, x0, None, generator=torch.Generator().manual_seed(1))
    _, target, pred, _ = _manual(TransportConfig(), x0, 1, lambda x, t: -x)
    # LightningDiT's term: cosine over the channels at each latent position, averaged
    cos = (1 - torch.nn.functional.cosine_similarity(pred, target, dim=1)).mean()
    whole = (1 - torch.nn.functional.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1)).mean()
    assert abs(cos.item() - whole.item()) > 1e-3  # the two definitions really differ here
    assert logs["cos"].item() == pytest.approx(cos.item(), rel=1e-6)
    assert loss_on.item() == pytest.approx(loss_off.item() + 0.5 * cos.item(), rel=1e-6)
    # a prediction parallel to the target (any positive scale) has no cosine loss
    _, logs = on(lambda x, t, y: 3 * x / t.view(-1, 1, 1, 1), torch.zeros(8, 4, 2, 2), None,
                 generator=torch.Generator().manual_seed(2))
    assert logs["cos"].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_rejects_wrong_shapes():
    loss_fn = FlowMatchingLoss(TransportConfig(), (2, 2, 2))
    with pytest.raises(ManifoldLabError, match="latent shape"):
        loss_fn(lambda x, t, y: x, torch.zeros(2, 3, 2, 2), None)
    with pytest.raises(ManifoldLabError, match="velocity"):
        loss_fn(lambda x, t, y: x[:, :1], torch.zeros(2, 2, 2, 2), None)
