"""Probes of pooled latents beside the geometry metrics: 2-D maps (t-SNE, UMAP), how well classes
separate in them (kNN accuracy, silhouette), and a linear-probe accuracy.

All run on the CPU with scikit-learn / umap-learn (inputs on any device are copied to numpy), with
explicit seeds so that maps and numbers are reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from manifold_lab.metrics._inputs import MetricInputError, float_matrix, label_ids


def _features(x: Any, what: str, min_rows: int = 2) -> np.ndarray:
    return float_matrix(x, what, min_rows=min_rows).cpu().numpy()


def tsne_2d(features: Any, seed: int = 0, perplexity: float = 30.0, max_iter: int = 1000,
            threads: int | None = None) -> np.ndarray:
    """t-SNE map (N, 2) of ``features`` (N, C) (scikit-learn, PCA init, fixed seed, ``max_iter`` >= 250).

    ``threads`` caps scikit-learn's OpenMP threads: on a busy machine each of t-SNE's many small
    parallel regions waits for a descheduled thread, and one thread can be several times faster.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    f = _features(features, "tsne: features")
    if not 0 < float(perplexity) < f.shape[0]:
        raise MetricInputError(f"tsne: perplexity must be in (0, N={f.shape[0]}), got {perplexity}; "
                               "lower it or pass more points")
    init = "pca" if f.shape[1] >= 2 else "random"
    tsne = TSNE(n_components=2, perplexity=float(perplexity), init=init, random_state=int(seed),
                max_iter=int(max_iter))
    with threadpool_limits(limits=threads, user_api="openmp"):
        emb = tsne.fit_transform(f)
    return np.asarray(emb, dtype=np.float64)


def umap_2d(features: Any, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """UMAP map (N, 2) of ``features`` (N, C) (umap-learn, fixed seed, hence single-threaded)."""
    import umap  # imported lazily: numba compilation makes the import slow

    f = _features(features, "umap: features", min_rows=3)
    if not 2 <= int(n_neighbors) < f.shape[0]:
        raise MetricInputError(f"umap: n_neighbors must be in [2, N={f.shape[0]}), got {n_neighbors}")
    reducer = umap.UMAP(n_components=2, n_neighbors=int(n_neighbors), min_dist=float(min_dist),
                        random_state=int(seed), n_jobs=1)  # a fixed seed forces one thread anyway
    return np.asarray(reducer.fit_transform(f), dtype=np.float64)


def knn_accuracy(embedding: Any, labels: Any, k: int = 10) -> float:
    """Leave-one-out kNN accuracy: each point's label vs the majority label of its k nearest others
    (Euclidean). Ties between labels go to the smallest label (as in scikit-learn's classifier)."""
    from sklearn.neighbors import NearestNeighbors

    e = _features(embedding, "knn_accuracy: embedding")
    n = e.shape[0]
    y = label_ids(labels, n, "knn_accuracy: labels")
    if not 1 <= int(k) < n:
        raise MetricInputError(f"knn_accuracy: k must be in [1, N-1={n - 1}], got {k}")
    k = int(k)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(e).kneighbors(e)
    # drop the point itself; with exact duplicates it may not come first, so remove it by index
    is_self = idx == np.arange(n)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True  # self not among the k+1: drop the farthest instead
    neigh = idx[~is_self].reshape(n, k)
    votes = np.zeros((n, int(y.max()) + 1), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(n), k), y[neigh].reshape(-1)), 1)
    return float((votes.argmax(axis=1) == y).mean())


def silhouette(embedding: Any, labels: Any, sample_size: int | None = None, seed: int = 0) -> float:
    """Mean silhouette coefficient (scikit-learn, Euclidean) of the labelled points; in [-1, 1].

    O(N^2): pass ``sample_size`` to estimate it on a seeded random subset.
    """
    from sklearn.metrics import silhouette_score

    e = _features(embedding, "silhouette: embedding")
    y = label_ids(labels, e.shape[0], "silhouette: labels")
    n_labels = int(y.max()) + 1
    if not 2 <= n_labels <= e.shape[0] - 1:
        raise MetricInputError(f"silhouette: needs 2..N-1 distinct labels, got {n_labels} for N={e.shape[0]}")
    return float(silhouette_score(e, y, sample_size=sample_size, random_state=int(seed)))


def linear_probe(features: Any, labels: Any, seed: int = 0, test_fraction: float = 0.2) -> dict[str, Any]:
    """Accuracy of a standardised logistic-regression probe on a stratified, seeded train/test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f = _features(features, "linear_probe: features")
    y = label_ids(labels, f.shape[0], "linear_probe: labels")
    if not 0 < float(test_fraction) < 1:
        raise MetricInputError(f"linear_probe: test_fraction must be in (0, 1), got {test_fraction}")
    counts = np.bincount(y)
    if counts.size < 2:
        raise MetricInputError("linear_probe: needs at least 2 classes")
    if counts.min() < 2:
        raise MetricInputError(f"linear_probe: every class needs >= 2 images for a stratified split; "
                               f"the smallest has {counts.min()}")
    try:
        xtr, xte, ytr, yte = train_test_split(f, y, test_size=float(test_fraction), random_state=int(seed),
                                              stratify=y)
    except ValueError as exc:
        raise MetricInputError(f"linear_probe: cannot split {f.shape[0]} images of {counts.size} classes with "
                               f"test_fraction={test_fraction} ({exc})") from exc
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=int(seed)))
    model.fit(xtr, ytr)
    return {"accuracy": float((model.predict(xte) == yte).mean()), "n_train": int(len(ytr)),
            "n_test": int(len(yte)), "seed": int(seed), "test_fraction": float(test_fraction)}
