"""eRank known answers: orthogonal equal-norm columns, rank one, and numpy's SVD entropy."""

import numpy as np
import pytest
import torch

from manifold_lab.errors import ManifoldLabError
from manifold_lab.metrics import effective_rank, erank_report


def test_orthogonal_equal_norm_columns_give_full_rank():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(50, 8)))
    f = 3.0 * q  # 8 orthogonal columns of norm 3: all singular values equal
    assert effective_rank(f) == pytest.approx(8.0, abs=1e-9)
    rep = erank_report(torch.as_tensor(f))
    assert rep["erank_normalized"] == pytest.approx(1.0, abs=1e-10)
    assert (rep["n"], rep["channels"], rep["centered"]) == (50, 8, False)


def test_rank_one_is_one():
    rng = np.random.default_rng(1)
    f = np.outer(rng.normal(size=30), rng.normal(size=6))
    assert effective_rank(f) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (500, 16)])  # wide, square-ish, tall (Gram path)
def test_matches_numpy_svd_entropy(shape):
    f = np.random.default_rng(2).normal(size=shape) * np.linspace(0.1, 3, shape[1])
    s = np.linalg.svd(f, compute_uv=False)
    p = s / s.sum()
    expected = float(np.exp(-(p * np.log(p)).sum()))
    assert effective_rank(torch.as_tensor(f, dtype=torch.float32)) == pytest.approx(expected, rel=1e-5)
    assert effective_rank(f) == pytest.approx(expected, rel=1e-9)


def test_not_centred_offset_lowers_rank():
    f = np.random.default_rng(3).normal(size=(200, 8))
    assert effective_rank(f + 100.0) < effective_rank(f) / 2


def test_bad_inputs_raise_one_line():
    with pytest.raises(ManifoldLabError, match=r"must be \(N, C\), got shape \(3, 4, 5\)"):
        effective_rank(np.zeros((3, 4, 5)))
    with pytest.raises(ManifoldLabError, match="1 NaN/inf"):
        effective_rank(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ManifoldLabError, match="all zero"):
        effective_rank(np.zeros((4, 3)))
