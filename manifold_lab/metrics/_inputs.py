"""Input checks shared by the metric modules.

Metrics are called from the CLI, from notebooks and from external checks with torch tensors or
numpy arrays. Every malformed input (wrong rank, mismatched rows, NaN/inf) must fail with one
line that names the metric, what was expected and what was received, instead of a deep torch
traceback or, worse, a silently wrong number.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from manifold_lab.errors import ManifoldLabError


class MetricInputError(ManifoldLabError, ValueError):
    """A metric received an input of the wrong shape, size or content.

    It is a :class:`ManifoldLabError` (the CLI prints its one line) and a :class:`ValueError`
    (what a Python caller expects from a bad argument).
    """


def as_tensor(x: Any, what: str, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """``x`` (tensor, ndarray, list) as a tensor, keeping a tensor's device unless ``device`` is given."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise MetricInputError(f"{what} must be a tensor or numeric array, got {type(x).__name__}") from exc
    if dtype is not None or device is not None:
        t = t.to(device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype)
    return t


def check_ndim(t: torch.Tensor, ndim: int, what: str, layout: str) -> None:
    if t.ndim != ndim:
        raise MetricInputError(f"{what} must be {layout}, got shape {tuple(t.shape)}")


def check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() or t.is_complex():
        bad = int((~torch.isfinite(t)).sum().item())
        if bad:
            raise MetricInputError(f"{what} contain {bad} NaN/inf values; fix the inputs before measuring")


def float_matrix(x: Any, what: str, *, dtype: torch.dtype = torch.float64, min_rows: int = 1) -> torch.Tensor:
    """A finite (N, C) float matrix on the input's device."""
    t = as_tensor(x, what)
    check_ndim(t, 2, what, "(N, C)")
    if t.shape[0] < min_rows:
        raise MetricInputError(f"{what} need at least {min_rows} rows, got {t.shape[0]}")
    if t.shape[1] < 1:
        raise MetricInputError(f"{what} need at least 1 column, got shape {tuple(t.shape)}")
    t = t.to(dtype)
    check_finite(t, what)
    return t


def label_ids(labels: Any, n: int, what: str) -> np.ndarray:
    """Labels of any hashable numeric/string dtype as compact int64 ids (0..K-1) on the CPU.

    Labels only decide equality, so their values are replaced by their rank among the distinct
    labels; that lets class names, negative ids or floats be used directly.
    """
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1:
        raise MetricInputError(f"{what} must be a 1-D array of N labels, got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise MetricInputError(f"{what} has {arr.shape[0]} entries but the features have {n} rows")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise MetricInputError(f"{what} contain NaN/inf values")
    _, ids = np.unique(arr, return_inverse=True)
    return ids.astype(np.int64).reshape(-1)
