"""GSQ known answers and agreement with scikit-learn's brute-force cosine 1-NN."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from manifold_lab.errors import ManifoldLabError
from manifold_lab.metrics import gsq, gsq_protocol


def _clusters(k=5, per=40, c=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, c)) * 5
    labels = np.repeat(np.arange(k), per)
    return centres[labels] + spread * rng.normal(size=(k * per, c)), labels


def test_well_separated_clusters_score_one():
    f, y = _clusters()
    assert gsq(f, y) == 1.0
    assert gsq(torch.as_tensor(f, dtype=torch.float32), torch.as_tensor(y), chunk_size=7) == 1.0


def test_shuffled_labels_score_about_one_over_k():
    k, n = 4, 2000
    f, _ = _clusters(k=k, per=n // k)
    y = np.random.default_rng(5).integers(0, k, size=n)
    # binomial std of the mean at p = 1/4 and n = 2000 is ~0.0097; 5 sigma
    assert gsq(f, y) == pytest.approx(1 / k, abs=0.05)


def test_equals_sklearn_loo_1nn_with_small_chunks():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(300, 12))
    y = rng.integers(0, 5, size=300)
    fc = f - f.mean(axis=0)
    _, idx = NearestNeighbors(n_neighbors=2, metric="cosine", algorithm="brute").fit(fc).kneighbors(fc)
    nn = np.where(idx[:, 0] == np.arange(300), idx[:, 1], idx[:, 0])
    expected = float((y[nn] == y).mean())
    assert gsq(f, y, chunk_size=64) == pytest.approx(expected, abs=1e-12)
    assert gsq(f, y, chunk_size=1) == pytest.approx(expected, abs=1e-12)


def test_ties_go_to_lowest_index():
    # row 0's two nearest neighbours (rows 1 and 2) are identical; the lower index wins
    f = np.array([[1.0, 0.1], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.05], [0.0, -1.0]])
    y_low = np.array([0, 0, 1, 2, 2, 3])
    y_high = np.array([0, 1, 0, 2, 2, 3])
    from manifold_lab.metrics.gsq import _centred_unit_rows, nearest_neighbour_loo

    nn = nearest_neighbour_loo(_centred_unit_rows(torch.as_tensor(f)), chunk_size=2)
    assert nn[1].item() == 2 and nn[2].item() == 1  # the twins find each other
    assert nn[0].item() == 1  # row 0 ties between rows 1 and 2: the lowest index wins
    # so only row 0's outcome differs between the two labelings: 1 / 6 apart
    assert gsq(f, y_low) - gsq(f, y_high) == pytest.approx(1 / 6)


def test_string_labels_and_centring_uses_given_rows():
    f, y = _clusters(k=3, per=10)
    names = np.array(["cat", "dog", "eel"])[y]
    assert gsq(f, names) == gsq(f, y)


def test_protocol_shapes_and_subsets():
    f, y = _clusters(k=6, per=30, spread=2.0, seed=3)
    res = gsq_protocol(f, y, num_classes=3, per_class=10, repeats=4, seed=1)
    assert len(res["values"]) == 4 and res["repeats"] == 4
    assert res["mean"] == pytest.approx(np.mean(res["values"]))
    assert res["std"] == pytest.approx(np.std(res["values"]))
    assert (res["num_classes"], res["per_class"], res["seed"]) == (3, 10, 1)
    again = gsq_protocol(f, y, num_classes=3, per_class=10, repeats=4, seed=1)
    assert again["values"] == res["values"]
    full = gsq_protocol(f, y, repeats=2)
    assert full["values"] == [gsq(f, y)] * 2 and full["std"] == 0.0


def test_protocol_repeat_equals_gsq_on_exactly_those_rows():
    f, y = _clusters(k=5, per=20, spread=3.0, seed=4)
    res = gsq_protocol(f, y, num_classes=2, per_class=8, repeats=1, seed=9)
    rng = np.random.default_rng(9)
    classes = np.sort(rng.choice(5, size=2, replace=False))
    rows = np.sort(np.concatenate([np.sort(rng.choice(np.flatnonzero(y == c), size=8, replace=False))
                                   for c in classes]))
    assert res["values"][0] == gsq(f[rows], y[rows])


def test_bad_inputs():
    f, y = _clusters(k=2, per=5)
    with pytest.raises(ManifoldLabError, match="has 9 entries but the features have 10 rows"):
        gsq(f, y[:9])
    with pytest.raises(ManifoldLabError, match="num_classes=3 but the labels hold 2"):
        gsq_protocol(f, y, num_classes=3)
    with pytest.raises(ManifoldLabError, match="per_class=6"):
        gsq_protocol(f, y, per_class=6)
    with pytest.raises(ValueError, match="NaN/inf"):
        gsq(np.where(np.eye(10, 16) > 0, np.inf, f), y)
