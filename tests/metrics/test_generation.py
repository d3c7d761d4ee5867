"""Improved precision / recall against brute force, and the Inception Score's known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.neighbors import NearestNeighbors

from manifold_lab.metrics import MetricInputError
from manifold_lab.metrics.generation import inception_score, knn_radii, precision_recall


pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition written out with full distance matrices (the row itself is neighbour 0)."""
    d_rr, d_ff, d_fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    precision = (d_fr <= r_real[None, :]).any(axis=1).mean()
    recall = (d_fr.T <= r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_knn_radii_match_sklearn() -> None:
    x = np.random.default_rng(0).normal(size=(53, 6))
    dist, _ = NearestNeighbors(n_neighbors=4).fit(x).kneighbors(x)  # column 0 is the point itself
    for chunk in (7, 53, 4096):
        r = knn_radii(x, k=3, chunk=chunk)
        assert r.dtype == torch.float64
        np.testing.assert_allclose(np.sqrt(r.numpy()), dist[:, 3], rtol=1e-10)


@pytest.mark.parametrize("chunk", [5, 16, 4096])
@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_equals_brute_force(chunk: int, k: int) -> None:
    rng = np.random.default_rng(k)
    real = rng.normal(size=(41, 5))
    fake = rng.normal(size=(37, 5)) * 1.3 + 0.4  # partly overlapping: neither 0 nor 1
    res = precision_recall(real, fake, k=k, chunk=chunk)
    p, r = _brute_pr(real, fake, k)
    assert 0 < p < 1 and 0 < r < 1
    assert res["precision"] == p and res["recall"] == r
    assert (res["k"], res["n_real"], res["n_fake"]) == (k, 41, 37)


def test_float32_features_on_a_realistic_offset() -> None:
    """Non-negative, far-from-origin features (like pool3) in float32 still match the float64 answer."""
    rng = np.random.default_rng(3)
    real = np.abs(rng.normal(size=(60, 32))) + 5.0
    fake = np.abs(rng.normal(size=(50, 32))) * 1.2 + 5.0
    res = precision_recall(torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32))
    p, r = _brute_pr(real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64), 3)
    assert res["precision"] == pytest.approx(p, abs=1 / 50 + 1e-12)  # at most one borderline point flips
    assert res["recall"] == pytest.approx(r, abs=1 / 60 + 1e-12)


def test_identical_sets_and_shifted_clouds() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real, chunk=64) == {"precision": 1.0, "recall": 1.0, "k": 3, "n_real": 200,
                                                      "n_fake": 200}
    fake = rng.normal(size=(200, 8))
    prec = [precision_recall(real, fake + s, chunk=64)["precision"] for s in (0.0, 1.0, 2.0, 6.0)]
    assert prec[0] > prec[1] > prec[2] > prec[3] and prec[0] > 0.6 and prec[3] == 0.0
    collapsed = precision_recall(real, 0.15 * fake)  # all samples in the dense middle: precise, poor coverage
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.35


def test_precision_recall_bad_inputs() -> None:
    with pytest.raises(MetricInputError, match="columns"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(MetricInputError, match="more than k=3"):
        precision_recall(np.random.rand(3, 2), np.random.rand(10, 2))
    with pytest.raises(MetricInputError, match="NaN"):
        precision_recall(np.full((10, 2), np.nan), np.random.rand(10, 2))


def test_inception_score_known_answers() -> None:
    assert inception_score(torch.zeros(100, 7), splits=10) == pytest.approx((1.0, 0.0), abs=1e-12)
    c = 8
    confident = 60.0 * torch.eye(c).repeat(10, 1)  # 80 samples, each class 10 times, one of each per split of 8
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(c, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    half = inception_score(60.0 * torch.eye(2)[torch.arange(40) % 2], splits=4)  # two classes only
    assert half[0] == pytest.approx(2.0, rel=1e-9)


def test_inception_score_matches_the_numpy_definition() -> None:
    logits = np.random.default_rng(2).normal(size=(30, 5)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, 3):
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    assert inception_score(logits, splits=3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    with pytest.raises(MetricInputError, match="splits"):
        inception_score(logits, splits=31)
