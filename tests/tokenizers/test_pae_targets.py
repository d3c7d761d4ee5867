"""PAE's refined-target stage: the structural low-pass target and the semantic projector."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from manifold_lab.errors import CheckpointError, ConfigError
from manifold_lab.tokenizers.pae_targets import (
    PROJECTOR_FILE,
    SemanticProjector,
    TargetConfig,
    pae_prepare,
    structural_target,
    train_semantic_projector,
)


def _high_freq_energy(x: torch.Tensor, cutoff: float = 0.5) -> float:
    """Energy of the spatial spectrum above ``cutoff`` x Nyquist (radially)."""
    spec = torch.fft.fft2(x.double()).abs() ** 2
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h).abs().view(-1, 1) / 0.5
    fx = torch.fft.fftfreq(w).abs().view(1, -1) / 0.5
    mask = torch.sqrt(fy ** 2 + fx ** 2) > cutoff
    return float(spec[..., mask].sum())


def test_structural_target_identity_at_zero_strength():
    f = torch.randn(2, 7, 8, 8)
    out = structural_target(f, 0.0)
    assert torch.equal(out, f)
    # a tiny strength barely changes anything: the operation is continuous at 0
    assert torch.allclose(structural_target(f, 1e-3), f, atol=1e-4)


@pytest.mark.parametrize("upsample", [1, 2, 4])
def test_structural_target_removes_high_frequencies_and_keeps_shape(upsample):
    torch.manual_seed(0)
    f = torch.randn(2, 5, 16, 16)
    out = structural_target(f, 0.4, upsample=upsample)
    assert out.shape == f.shape and out.dtype == f.dtype
    assert _high_freq_energy(out) < 0.8 * _high_freq_energy(f)
    # stronger filtering removes more
    assert _high_freq_energy(structural_target(f, 1.0, upsample)) < _high_freq_energy(out)
    # a constant map is a fixed point (DC passes unchanged)
    c = torch.full((1, 3, 8, 8), 2.5)
    assert torch.allclose(structural_target(c, 0.4, upsample), c, atol=1e-5)


def test_structural_target_nyquist_response_matches_docstring():
    x = torch.ones(1, 1, 16, 16)
    x[..., 1::2] = -1.0  # Nyquist along x
    y = structural_target(x, 0.4, upsample=4)
    assert abs(float(y[0, 0, 8, 8]) - 0.39) < 0.01


def test_target_config_validation():
    with pytest.raises(ConfigError):
        TargetConfig(mode="fancy")
    with pytest.raises(ConfigError):
        TargetConfig(lowpass_strength=-0.1)
    with pytest.raises(ConfigError):
        TargetConfig(projector_steps=0)
    with pytest.raises(ConfigError):
        TargetConfig(projector_lr=0.0)
    with pytest.raises(ConfigError):
        TargetConfig(projector_recon_weight=0.0, projector_cosine_weight=0.0)
    assert TargetConfig().lowpass_strength == 0.4


def test_projector_shapes_and_rms():
    p = SemanticProjector(24, 6, hidden=16)
    f = torch.randn(3, 24, 4, 4) * 5 + 2
    t = p.project(f)
    assert t.shape == (3, 6, 4, 4)
    rms = t.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    assert p.deproject(t).shape == f.shape


class _TinyEncoder(nn.Module):
    """A fixed random conv 'VFM': 32x32 images -> (B, 24, 8, 8)."""

    embed_dim = 24

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 24, 4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.conv(x)) * 3.0


def _dataset(n=48):
    g = torch.Generator().manual_seed(1)
    # images with spatial structure (low-rank features) so that a 6-channel code can explain them
    base = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    imgs = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    return [(imgs[i], 0) for i in range(n)]


def _cfg(**kw):
    base = dict(projector_hidden=32, projector_steps=60, projector_lr=3e-3, projector_batch_size=16,
                projector_images=32)
    base.update(kw)
    return TargetConfig(**base)


def test_projector_training_lowers_loss_and_is_resumable(tmp_path):
    enc = _TinyEncoder()
    data = _dataset()
    cfg = _cfg()
    p1 = train_semantic_projector(enc, data, cfg, tmp_path, progress=False, out_dim=6, seed=0)
    h = p1.history
    assert len(h) == cfg.projector_steps and all(math.isfinite(v) for v in h)
    assert sum(h[-10:]) / 10 < 0.7 * sum(h[:5]) / 5
    assert not any(p.requires_grad for p in p1.parameters()) and not p1.training
    assert (tmp_path / "targets" / PROJECTOR_FILE).is_file()

    calls = enc.calls
    p2 = train_semantic_projector(enc, data, cfg, tmp_path, progress=False, out_dim=6, seed=0)
    assert enc.calls == calls  # loaded: no feature extraction, no training
    assert p2.loaded_from is not None
    for k, v in p1.state_dict().items():
        assert torch.equal(v, p2.state_dict()[k]), k
    f = enc(data[0][0][None])
    assert p2.project(f).shape == (1, 6, 8, 8)  # the latent's shape (C, h, w)

    with pytest.raises(CheckpointError):  # saved for other settings: one clear line, no silent reuse
        train_semantic_projector(enc, data, _cfg(projector_hidden=16), tmp_path, progress=False, out_dim=6)


class _FakePAE:
    """What pae_prepare relies on: config.targets, z_channels, frozen('vfm'), set_semantic_projector."""

    def __init__(self, mode):
        self.config = SimpleNamespace(targets=_cfg(mode=mode, projector_steps=10))
        self.z_channels = 6
        self._vfm = _TinyEncoder()
        self.projector = None

    def frozen(self, name):
        assert name == "vfm"
        return self._vfm

    def set_semantic_projector(self, projector):
        self.projector = projector


def test_pae_prepare_hook(tmp_path):
    recipe = SimpleNamespace(train=SimpleNamespace(device="cpu", seed=0))
    raw = _FakePAE("raw")
    pae_prepare(raw, recipe, _dataset(16), tmp_path / "raw", progress=False)
    assert raw.projector is None and not (tmp_path / "raw").exists()
    refined = _FakePAE("refined")
    pae_prepare(refined, recipe, _dataset(16), tmp_path / "ref", progress=True)
    assert isinstance(refined.projector, SemanticProjector)
    assert refined.projector.out_dim == 6
    assert (tmp_path / "ref" / "targets" / PROJECTOR_FILE).is_file()


class _KeyedData(list):
    cache_key = "tiny-random/train@32"


class _NamedEncoder(_TinyEncoder):
    def identity(self):
        return "tiny-conv@32|fixed-seed-3"


def test_feature_extraction_is_shared_between_runs(tmp_path):
    """Two runs (e.g. two ablations of one recipe) extract the VFM features once (shared feature cache)."""
    enc = _NamedEncoder()
    data = _KeyedData(_dataset(24))
    cfg = _cfg(projector_steps=5)
    p1 = train_semantic_projector(enc, data, cfg, tmp_path / "a", out_dim=6, seed=0)
    calls = enc.calls
    assert calls > 0
    p2 = train_semantic_projector(enc, data, cfg, tmp_path / "b", out_dim=6, seed=0)
    assert enc.calls == calls  # features from the cache; the projector itself is retrained ...
    for k, v in p1.state_dict().items():  # ... and comes out identical for the same seed
        assert torch.allclose(v, p2.state_dict()[k]), k


def test_feature_stats_match_torch():
    p = SemanticProjector(5, 2, 4)
    f = torch.randn(600, 5, 3, 3) * torch.arange(1, 6).view(1, 5, 1, 1) + 3
    p.set_feature_stats(f)
    flat = f.transpose(0, 1).reshape(5, -1)
    assert torch.allclose(p.feat_mean, flat.mean(1), atol=1e-4)
    assert torch.allclose(p.feat_std, flat.std(1), atol=1e-4)


def test_pae_prepare_under_ddp_loads_rank0_file(tmp_path, monkeypatch):
    """A non-zero rank waits at the barrier, then loads rank 0's projector instead of training one."""
    from manifold_lab import distributed

    recipe = SimpleNamespace(train=SimpleNamespace(device="cpu", seed=0))
    first = _FakePAE("refined")
    pae_prepare(first, recipe, _dataset(16), tmp_path, progress=False)  # "rank 0" wrote the file
    barriers = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(distributed, "init_from_env", lambda *a, **k: True)
    monkeypatch.setattr(distributed, "barrier", lambda *a, **k: barriers.append(1))
    other = _FakePAE("refined")
    pae_prepare(other, recipe, _dataset(16), tmp_path, progress=False)
    assert barriers == [1] and other._vfm.calls == 0  # no feature extraction, no training
    assert other.projector.loaded_from is not None
    for k, v in first.projector.state_dict().items():
        assert torch.equal(v, other.projector.state_dict()[k])
