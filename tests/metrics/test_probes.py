"""Probes: t-SNE / UMAP maps of clustered data separate the classes; kNN and silhouette known values."""

import numpy as np
import pytest

from manifold_lab.errors import ManifoldLabError
from manifold_lab.metrics import knn_accuracy, linear_probe, silhouette, tsne_2d


def _blobs(k=3, per=30, c=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, c)) * 10
    y = np.repeat(np.arange(k), per)
    return centres[y] + rng.normal(size=(k * per, c)), y


def test_knn_accuracy_known_value():
    e = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    y = np.array([0, 0, 1, 1, 1, 0])
    # k=1: neighbours 1,0,1(tie->lower index 1),4,3,4 -> labels 0,0,0,1,1,1 vs 0,0,1,1,1,0 -> 4/6
    assert knn_accuracy(e, y, k=1) == pytest.approx(4 / 6)
    # duplicates: the point itself is removed even when its twin is returned first
    assert knn_accuracy(np.zeros((4, 2)), np.array([0, 0, 1, 1]), k=1) in (0.0, 0.5, 1.0)


def test_silhouette_known_value():
    e = np.array([[0.0], [1.0], [10.0], [11.0]])
    y = np.array([0, 0, 1, 1])
    # point 0: a = 1, b = (10 + 11) / 2 = 10.5 -> s = 1 - 1/10.5; symmetric for all four points
    assert silhouette(e, y) == pytest.approx(1 - 1 / 10.5, abs=0.02)
    assert silhouette(e, y) == pytest.approx(np.mean([1 - 1 / 10.5, 1 - 1 / 9.5, 1 - 1 / 9.5, 1 - 1 / 10.5]))


def test_tsne_map_of_clusters_separates_classes():
    f, y = _blobs()
    emb = tsne_2d(f, seed=0, perplexity=10, max_iter=250, threads=1)
    assert emb.shape == (90, 2)
    assert knn_accuracy(emb, y, k=5) == 1.0
    assert silhouette(emb, y) > 0.5
    np.testing.assert_allclose(tsne_2d(f[:45], seed=0, perplexity=10, max_iter=250, threads=1),
                               tsne_2d(f[:45], seed=0, perplexity=10, max_iter=250, threads=1))  # seeded


def test_linear_probe_on_separable_and_random_labels():
    f, y = _blobs(k=4, per=25)
    res = linear_probe(f, y, seed=0, test_fraction=0.2)
    assert res["accuracy"] == 1.0 and (res["n_train"], res["n_test"]) == (80, 20)
    rand = linear_probe(np.random.default_rng(1).normal(size=(400, 5)), np.repeat(np.arange(4), 100), seed=0)
    assert rand["accuracy"] < 0.45  # chance is 0.25


def test_bad_inputs():
    f, y = _blobs()
    with pytest.raises(ManifoldLabError, match="perplexity"):
        tsne_2d(f[:20], perplexity=30)
    with pytest.raises(ManifoldLabError, match="k must be"):
        knn_accuracy(f, y, k=90)
    with pytest.raises(ManifoldLabError, match="2..N-1 distinct labels"):
        silhouette(f, np.zeros(90))
    with pytest.raises(ManifoldLabError, match="smallest has 1"):
        linear_probe(f, np.r_[y[:-1], 7])
