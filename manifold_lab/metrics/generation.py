"""Sample-quality numbers of a generator beside FID: improved precision / recall and the Inception Score.

Precision and recall (Kynkäänniemi et al., 2019, "Improved Precision and Recall Metric for
Assessing Generative Models") estimate each feature set's manifold as the union of balls around
its points, each ball's radius being the distance to the point's ``k``-th nearest neighbour in its
own set (``k = 3``). Precision is the fraction of generated points inside the real manifold;
recall the fraction of real points inside the generated manifold. As in ADM's evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``): the radius counts the point itself as its
0-th neighbour (so it is the ``k``-th *other* point), and "inside" is ``distance <= radius``.

Our choices: distances are computed in blocks of ``chunk x chunk`` on the features' device with
the ``|a|^2 - 2 a.b + |b|^2`` form (squared distances: the comparison is the same), after
subtracting the real mean (distances do not change; the cancellation error of that form shrinks),
in float64 when an input is float64 and float32 otherwise (ADM uses float16 with a float32
fallback). Nothing of size ``N x N`` is ever held: the k-NN radii keep a running ``k + 1`` smallest
distances per row; the cross pass ORs membership per block. Self-distances are set to exactly 0.

The Inception Score follows improved-GAN / ADM: ``exp(E_x KL(p(y|x) || p(y)))`` with ``p(y)`` the
mean prediction of a split, computed on ``splits`` equal consecutive splits; the mean and the
(population) standard deviation over splits are returned. It takes classifier *logits*
(softmaxed here in float64 via ``log_softmax``, so confident logits do not underflow to log 0).

FID itself lives in :mod:`manifold_lab.metrics.fid` (``frechet_distance``, ``FeatureStats``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from manifold_lab.metrics._inputs import MetricInputError, as_tensor, check_finite, check_ndim

DEFAULT_CHUNK = 4096  # 4096 x 4096 float32 distances = 64 MiB per block


def _features(x: Any, what: str) -> torch.Tensor:
    t = as_tensor(x, what)
    check_ndim(t, 2, what, "(N, D)")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    check_finite(t, what)
    return t


def _sqdist(a: torch.Tensor, a2: torch.Tensor, b: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (|a|^2 - 2 a.b + |b|^2, clipped at 0) of two row blocks."""
    return (a2[:, None] - 2.0 * (a @ b.T) + b2[None, :]).clamp_min_(0.0)


def knn_radii(features: Any, k: int = 3, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Squared distance of every row to its ``k``-th nearest other row (the row itself is neighbour 0).

    Blocked: memory is ``chunk x chunk`` distances plus ``N x (k + 1)`` running minima.
    """
    x = _features(features, "knn_radii: features")
    n = x.shape[0]
    if k < 1:
        raise MetricInputError(f"knn_radii: k must be >= 1, got {k}")
    if n < k + 1:
        raise MetricInputError(f"knn_radii: need more than k={k} points to find k neighbours, got {n}")
    chunk = max(1, int(chunk))
    sq = (x * x).sum(dim=1)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        best = torch.full((r1 - r0, k + 1), float("inf"), dtype=x.dtype, device=x.device)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            d = _sqdist(x[r0:r1], sq[r0:r1], x[c0:c1], sq[c0:c1])
            lo, hi = max(r0, c0), min(r1, c1)
            if lo < hi:  # this block holds some rows' distance to themselves: exactly 0
                idx = torch.arange(lo, hi, device=x.device)
                d[idx - r0, idx - c0] = 0.0
            best = torch.cat([best, d], dim=1).topk(k + 1, dim=1, largest=False).values
        radii[r0:r1] = best[:, k]
    return radii


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 3, chunk: int = DEFAULT_CHUNK,
                     device: torch.device | str | None = None) -> dict[str, Any]:
    """Improved precision and recall of ``fake_feats`` (N_f, D) against ``real_feats`` (N_r, D).

    Returns ``{"precision", "recall", "k", "n_real", "n_fake"}``. ``device`` defaults to the real
    features' device; both sets need more than ``k`` rows.
    """
    real = _features(real_feats, "precision_recall: real features")
    fake = _features(fake_feats, "precision_recall: fake features")
    if real.shape[1] != fake.shape[1]:
        raise MetricInputError(f"precision_recall: real and fake features have {real.shape[1]} and "
                               f"{fake.shape[1]} columns; they must come from the same network")
    dtype = torch.float64 if torch.float64 in (real.dtype, fake.dtype) else torch.float32
    dev = torch.device(device) if device is not None else real.device
    real, fake = real.to(dev, dtype), fake.to(dev, dtype)
    center = real.mean(dim=0, keepdim=True)
    real, fake = real - center, fake - center
    chunk = max(1, int(chunk))
    r_real = knn_radii(real, k, chunk)
    r_fake = knn_radii(fake, k, chunk)
    sq_real, sq_fake = (real * real).sum(dim=1), (fake * fake).sum(dim=1)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=dev)  # precision: fake inside real manifold
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=dev)  # recall: real inside fake manifold
    for f0 in range(0, fake.shape[0], chunk):
        f1 = min(fake.shape[0], f0 + chunk)
        for r0 in range(0, real.shape[0], chunk):
            r1 = min(real.shape[0], r0 + chunk)
            d = _sqdist(fake[f0:f1], sq_fake[f0:f1], real[r0:r1], sq_real[r0:r1])
            fake_in[f0:f1] |= (d <= r_real[None, r0:r1]).any(dim=1)
            real_in[r0:r1] |= (d <= r_fake[f0:f1, None]).any(dim=0)
    return {"precision": float(fake_in.double().mean()), "recall": float(real_in.double().mean()), "k": int(k),
            "n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` of ``exp(mean_x KL(p(y|x) || p(y)))`` from classifier logits (N, C).

    ``splits`` consecutive, (nearly) equal parts, as improved-GAN; the std is the population std.
    """
    t = as_tensor(logits, "inception_score: logits")
    check_ndim(t, 2, "inception_score: logits", "(N, classes)")
    t = t.to(torch.float64)
    check_finite(t, "inception_score: logits")
    n = t.shape[0]
    if int(splits) < 1 or n < int(splits):
        raise MetricInputError(f"inception_score: need 1 <= splits <= N, got splits={splits} for N={n}; "
                               "use fewer splits or more samples")
    logp = torch.log_softmax(t, dim=1)
    scores = []
    for i in range(int(splits)):
        part = logp[i * n // splits:(i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log of the split's mean prediction
        kl = (part.exp() * (part - log_py[None, :])).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    arr = np.asarray(scores)
    return float(arr.mean()), float(arr.std())


__all__ = ["DEFAULT_CHUNK", "inception_score", "knn_radii", "precision_recall"]
