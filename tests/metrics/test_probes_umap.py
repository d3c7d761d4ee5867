"""UMAP probe (its own file: numba compiles umap-learn on first use, which takes a while)."""

import numpy as np
import pytest

from manifold_lab.errors import ManifoldLabError
from manifold_lab.metrics import knn_accuracy, silhouette, umap_2d


def _blobs(k=3, per=20, c=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, c)) * 10
    y = np.repeat(np.arange(k), per)
    return centres[y] + rng.normal(size=(k * per, c)), y


def test_umap_map_of_clusters_separates_classes():
    f, y = _blobs()
    emb = umap_2d(f, seed=0, n_neighbors=10)
    assert emb.shape == (60, 2)
    assert knn_accuracy(emb, y, k=5) == 1.0
    assert silhouette(emb, y) > 0.5
    with pytest.raises(ManifoldLabError, match="n_neighbors"):
        umap_2d(f[:5], n_neighbors=10)
