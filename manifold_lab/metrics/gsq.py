"""GSQ, global semantic quality: leave-one-out 1-NN label agreement of pooled latents (higher is better).

The paper measures it on 100 ImageNet classes; we must also scale to 50k x 1k features, so the
nearest neighbour search is chunked: a block of ``chunk_size`` queries against all N rows at a
time, keeping only the running top-1. Memory is O(chunk_size * N), never N x N: at N = 50k the
default chunk of 1024 needs about 0.4 GB and is as fast as 4096 (1.6 GB; benchmarks/bench_gsq.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from manifold_lab.metrics._inputs import MetricInputError, float_matrix, label_ids


def _centred_unit_rows(f: torch.Tensor) -> torch.Tensor:
    """Centre by the mean of exactly these rows, then L2-normalise each row.

    A row equal to the mean becomes the zero vector (cosine 0 with everything), as scikit-learn's
    ``normalize`` treats it, instead of NaN.
    """
    f = f - f.mean(dim=0, keepdim=True)
    norms = f.norm(dim=1, keepdim=True)
    return f / torch.where(norms > 0, norms, torch.ones_like(norms))


def nearest_neighbour_loo(unit: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Index of each row's most cosine-similar *other* row; ties go to the lowest index.

    ``torch.argmax`` returns the first maximal index on CPU and CUDA, which gives the tie-break.
    """
    n = unit.shape[0]
    out = torch.empty(n, dtype=torch.long, device=unit.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = unit[start:stop] @ unit.T  # (chunk, N)
        rows = torch.arange(stop - start, device=unit.device)
        sims[rows, rows + start] = -torch.inf
        out[start:stop] = sims.argmax(dim=1)
        del sims  # free this chunk before the next one is allocated: one (chunk, N) block at a time
    return out


def gsq(pooled: Any, labels: Any, chunk_size: int = 1024, dtype: torch.dtype = torch.float64) -> float:
    """Fraction of rows whose leave-one-out cosine 1-NN (after centring) has the same label.

    ``pooled`` (N, C) are pooled latents; ``labels`` (N,) any comparable labels. Computed on the
    input's device in ``dtype`` (float64 by default so ties and near-ties match a float64 reference).
    """
    f = float_matrix(pooled, "gsq: pooled", dtype=dtype, min_rows=2)
    ids = torch.as_tensor(label_ids(labels, f.shape[0], "gsq: labels"), device=f.device)
    if int(chunk_size) < 1:
        raise MetricInputError(f"gsq: chunk_size must be >= 1, got {chunk_size}")
    nn = nearest_neighbour_loo(_centred_unit_rows(f), int(chunk_size))
    return float((ids[nn] == ids).double().mean().item())


def gsq_protocol(pooled: Any, labels: Any, num_classes: int | None = None, per_class: int | None = None,
                 repeats: int = 5, seed: int = 0, chunk_size: int = 1024) -> dict[str, Any]:
    """The paper's protocol: ``repeats`` random subsets of ``num_classes`` classes x ``per_class``
    images each; GSQ on exactly those rows (centred by their own mean); mean and std over repeats.

    ``None`` means "all" for both. The std is the population std (ddof=0) of the repeat values.
    Subsets are drawn with ``numpy.random.default_rng(seed)``, classes in sorted-label order.
    """
    f = float_matrix(pooled, "gsq: pooled", min_rows=2)
    ids = label_ids(labels, f.shape[0], "gsq: labels")
    if int(repeats) < 1:
        raise MetricInputError(f"gsq: repeats must be >= 1, got {repeats}")
    n_avail = int(ids.max()) + 1
    if num_classes is not None and not 1 <= int(num_classes) <= n_avail:
        raise MetricInputError(f"gsq: num_classes={num_classes} but the labels hold {n_avail} classes; "
                               f"pass a value in 1..{n_avail} or None for all")
    members = [np.flatnonzero(ids == c) for c in range(n_avail)]
    if per_class is not None:
        if int(per_class) < 1:
            raise MetricInputError(f"gsq: per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(int(repeats)):
        if num_classes is None:
            classes = np.arange(n_avail)
        else:
            classes = np.sort(rng.choice(n_avail, size=int(num_classes), replace=False))
        rows = []
        for c in classes:
            m = members[c]
            if per_class is None:
                rows.append(m)
                continue
            if m.size < int(per_class):
                raise MetricInputError(f"gsq: class {c} (in sorted label order) has {m.size} images but "
                                       f"per_class={per_class}; lower per_class or pass None for all")
            rows.append(np.sort(rng.choice(m, size=int(per_class), replace=False)))
        idx = np.sort(np.concatenate(rows))
        if idx.size < 2:
            raise MetricInputError("gsq: a repeat selected fewer than 2 images; raise num_classes or per_class")
        sel = torch.as_tensor(idx, device=f.device)
        values.append(gsq(f[sel], ids[idx], chunk_size=chunk_size))
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "values": [float(v) for v in arr],
        "num_classes": None if num_classes is None else int(num_classes),
        "per_class": None if per_class is None else int(per_class),
        "repeats": int(repeats),
        "seed": int(seed),
        "chunk_size": int(chunk_size),
        "classes_available": n_avail,
        "n_total": int(f.shape[0]),
    }
