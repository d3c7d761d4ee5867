"""FID known answers, the eigen fallback of the matrix square root, and FeatureStats."""

import numpy as np
import pytest
import torch

import manifold_lab.metrics.fid as fid_mod
from manifold_lab.errors import ManifoldLabError
from manifold_lab.io import load_tensors, save_tensors
from manifold_lab.metrics import FeatureStats, fid_from_features, frechet_distance, sqrtm_product


def _gaussians(dim=6, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    closed = float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())
    return mu1, mu2, a, b, q, closed


def test_identical_sets_give_zero():
    f = np.random.default_rng(1).normal(size=(200, 16))
    assert fid_from_features(f, f) < 1e-6
    assert fid_from_features(torch.as_tensor(f, dtype=torch.float32), f) < 1e-6


def test_diagonal_gaussians_closed_form():
    mu1, mu2, a, b, _, closed = _gaussians()
    res = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert res["fid"] == pytest.approx(closed, rel=1e-10)
    assert res["sqrtm_method"] == "scipy-sqrtm" and res["imag_residue"] <= 1e-3


def test_commuting_full_covariances_closed_form():
    mu1, mu2, a, b, q, closed = _gaussians(seed=2)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # same eigenvectors: tr sqrt = sum sqrt(ab)
    assert frechet_distance(torch.as_tensor(mu1), torch.as_tensor(s1), mu2, s2)["fid"] == pytest.approx(closed, rel=1e-8)


def test_fallback_when_scipy_returns_nan(monkeypatch):
    mu1, mu2, a, b, q, closed = _gaussians(seed=3)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", lambda m: np.full_like(m, np.nan))
    res = frechet_distance(mu1, s1, mu2, s2)
    assert res["sqrtm_method"] == "eigh" and res["fid"] == pytest.approx(closed, rel=1e-8)
    assert sqrtm_product(s1, s2)[1] == "eigh"


def test_fallback_when_scipy_returns_a_large_imaginary_part(monkeypatch):
    mu1, mu2, a, b, q, closed = _gaussians(seed=4)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    real = fid_mod.scipy.linalg.sqrtm
    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", lambda m: real(m) + 0.5j)
    res = frechet_distance(mu1, s1, mu2, s2)
    assert res["sqrtm_method"] == "eigh" and res["imag_residue"] == pytest.approx(0.5)
    assert res["fid"] == pytest.approx(closed, rel=1e-8)


def test_both_methods_agree_on_a_singular_case():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(5, 12)), rng.normal(size=(5, 12)) + 0.3  # 5 samples in 12-D: rank-4 covariances
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = fid_mod._eig_trace_sqrt(s1, s2)
    trace, _ = sqrtm_product(s1, s2)
    assert trace == pytest.approx(eig, rel=1e-4)
    assert fid_from_features(x, y) == pytest.approx(
        float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * eig), rel=1e-4)


def test_feature_stats_match_numpy_and_merge():
    f = np.random.default_rng(6).normal(size=(101, 5)) * 3 + 10
    whole, a, b = FeatureStats(5), FeatureStats(5), FeatureStats(5)
    whole.update(f)
    a.update(torch.as_tensor(f[:40]))
    b.update(f[40:])
    np.testing.assert_allclose(whole.mean().numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(whole.cov().numpy(), np.cov(f, rowvar=False), rtol=1e-9)
    merged = a.merge(b)
    assert merged.n == 101
    np.testing.assert_allclose(merged.cov().numpy(), whole.cov().numpy(), rtol=1e-12, atol=1e-11)


def test_feature_stats_state_round_trip(tmp_path):
    f = np.random.default_rng(7).normal(size=(30, 4))
    st = FeatureStats(4)
    st.update(f)
    save_tensors(tmp_path / "ref.safetensors", st.state_dict())
    back = FeatureStats.from_state_dict(load_tensors(tmp_path / "ref.safetensors"))
    assert back.n == 30
    assert torch.equal(back.cov(), st.cov()) and torch.equal(back.mean(), st.mean())
    other = FeatureStats(4)
    other.update(f[:20])
    assert back.frechet_distance(st)["fid"] < 1e-9 and other.frechet_distance(st)["fid"] > 0


def test_bad_inputs():
    st = FeatureStats(3)
    with pytest.raises(ManifoldLabError, match="have 4 columns, expected 3"):
        st.update(np.zeros((2, 4)))
    with pytest.raises(ManifoldLabError, match="no features"):
        st.mean()
    st.update(np.zeros((1, 3)))
    with pytest.raises(ManifoldLabError, match="at least 2 feature rows"):
        st.cov()
    with pytest.raises(ManifoldLabError, match="equal F"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ManifoldLabError, match="missing outer_sum"):
        FeatureStats.from_state_dict({"n": torch.tensor(1), "sum": torch.zeros(3)})
