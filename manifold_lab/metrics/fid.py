"""Fréchet distance between feature Gaussians (FID / rFID), with a streaming feature accumulator.

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The matrix square root is the fragile part: ``scipy.linalg.sqrtm`` of a product of two
near-singular covariances can return NaN/inf or a complex matrix whose imaginary part is not
round-off. We then fall back to the symmetric formulation: tr((S1 S2)^(1/2)) equals
tr((S1^(1/2) S2 S1^(1/2))^(1/2)), whose argument is symmetric PSD, so its eigenvalues (clipped
at 0) give the trace stably. Which method was used and the imaginary residue are reported.
"""

from __future__ import annotations

import warnings

import math
from typing import Any

import numpy as np
import scipy.linalg
import torch

from manifold_lab.distributed import all_reduce_sum, is_distributed
from manifold_lab.metrics._inputs import MetricInputError, as_tensor, check_finite, check_ndim, float_matrix

# Largest |imaginary part| of scipy's sqrtm accepted as round-off (pytorch-fid uses the same 1e-3).
IMAG_TOL = 1e-3


class FeatureStats:
    """Running float64 sum, sum of outer products and count of (B, F) feature batches.

    ``mean()``/``cov()`` sum the state over processes first (a collective call under DDP: every
    rank must call it). ``state_dict()`` holds the process-reduced state, ready for safetensors.
    """

    def __init__(self, dim: int) -> None:
        if int(dim) < 1:
            raise MetricInputError(f"FeatureStats: dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._n = 0

    def _init_state(self, device: torch.device) -> None:
        self._sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self._outer = torch.zeros((self.dim, self.dim), dtype=torch.float64, device=device)

    @property
    def n(self) -> int:
        return self._n

    def update(self, features: Any) -> None:
        f = as_tensor(features, "FeatureStats: features")
        check_ndim(f, 2, "FeatureStats: features", f"(B, {self.dim})")
        if f.shape[1] != self.dim:
            raise MetricInputError(f"FeatureStats: features have {f.shape[1]} columns, expected {self.dim}")
        f = f.to(torch.float64)
        check_finite(f, "FeatureStats: features")
        if self._sum is None:
            self._init_state(f.device)
        f = f.to(self._sum.device)
        self._sum += f.sum(dim=0)
        self._outer += f.T @ f
        self._n += f.shape[0]

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another accumulator's state into this one (same dim); returns self."""
        if other.dim != self.dim:
            raise MetricInputError(f"FeatureStats: cannot merge dim {other.dim} into dim {self.dim}")
        if other._sum is not None:
            if self._sum is None:
                self._init_state(other._sum.device)
            self._sum += other._sum.to(self._sum.device)
            self._outer += other._outer.to(self._sum.device)
            self._n += other._n
        return self

    def _reduced(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        if self._sum is None:
            if is_distributed():
                import torch.distributed as dist

                dev = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                       else torch.device("cpu"))
            else:
                dev = torch.device("cpu")
            self._init_state(dev)
        n = torch.tensor([float(self._n)], dtype=torch.float64, device=self._sum.device)
        return (int(round(all_reduce_sum(n).item())), all_reduce_sum(self._sum), all_reduce_sum(self._outer))

    def mean(self) -> torch.Tensor:
        n, s, _ = self._reduced()
        if n < 1:
            raise MetricInputError("FeatureStats: no features were accumulated; call update() first")
        return s / n

    def cov(self) -> torch.Tensor:
        """Unbiased covariance (divides by n - 1)."""
        n, s, outer = self._reduced()
        if n < 2:
            raise MetricInputError(f"FeatureStats: the covariance needs at least 2 feature rows, got {n}")
        mu = s / n
        c = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return (c + c.T) / 2

    def state_dict(self) -> dict[str, torch.Tensor]:
        n, s, outer = self._reduced()
        return {"n": torch.tensor(n, dtype=torch.int64), "sum": s.detach().cpu().clone(),
                "outer_sum": outer.detach().cpu().clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "FeatureStats":
        missing = {"n", "sum", "outer_sum"} - set(state)
        if missing:
            raise MetricInputError(f"FeatureStats: state is missing {', '.join(sorted(missing))}; "
                                   "it was not written by FeatureStats.state_dict()")
        s = state["sum"].to(torch.float64)
        outer = state["outer_sum"].to(torch.float64)
        if s.ndim != 1 or tuple(outer.shape) != (s.shape[0], s.shape[0]):
            raise MetricInputError(f"FeatureStats: inconsistent state shapes sum {tuple(s.shape)}, "
                                   f"outer_sum {tuple(outer.shape)}")
        obj = cls(s.shape[0])
        obj._sum, obj._outer, obj._n = s.clone(), outer.clone(), int(state["n"].item())
        return obj

    def frechet_distance(self, other: "FeatureStats") -> dict[str, Any]:
        return frechet_distance(self.mean(), self.cov(), other.mean(), other.cov())


def _as_numpy64(x: Any, what: str) -> np.ndarray:
    t = as_tensor(x, what)
    check_finite(t, what)
    return t.detach().to("cpu", torch.float64).numpy()


def _eig_trace_sqrt(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1^(1/2) S2 S1^(1/2))^(1/2)) via two symmetric eigendecompositions, negatives clipped."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s2 @ root
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray, imag_tol: float = IMAG_TOL) -> tuple[float, str, float]:
    """(tr sqrt(S1 S2), method, imaginary residue of scipy's result)."""
    try:
        with warnings.catch_warnings():  # singular products are expected; the checks below handle them
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm(s1 @ s2)
        if isinstance(root, tuple):  # older scipy with disp=False semantics
            root = root[0]
        root = np.asarray(root)
    except (ValueError, np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return _eig_trace_sqrt(s1, s2), "eigh", float("nan")
    residue = float(np.abs(np.imag(root)).max()) if np.iscomplexobj(root) else 0.0
    if not np.isfinite(root).all() or not math.isfinite(residue) or residue > imag_tol:
        return _eig_trace_sqrt(s1, s2), "eigh", residue
    return float(np.real(np.trace(root))), "scipy-sqrtm", residue


def sqrtm_product(sigma1: Any, sigma2: Any, imag_tol: float = IMAG_TOL) -> tuple[float, str]:
    """Trace of sqrt(sigma1 @ sigma2) and the method that produced it ("scipy-sqrtm" or "eigh").

    Only the trace enters FID, so the trace (not the matrix) is returned; the eigen fallback never
    forms the matrix root of the product.
    """
    s1 = _as_numpy64(sigma1, "sqrtm_product: sigma1")
    s2 = _as_numpy64(sigma2, "sqrtm_product: sigma2")
    if s1.ndim != 2 or s1.shape[0] != s1.shape[1] or s1.shape != s2.shape:
        raise MetricInputError(f"sqrtm_product: need two square matrices of the same size, got {s1.shape} and {s2.shape}")
    trace, method, _ = _sqrtm_trace(s1, s2, imag_tol)
    return trace, method


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, imag_tol: float = IMAG_TOL) -> dict[str, Any]:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2) with the sqrtm method and its residue.

    Round-off can make an exact zero slightly negative; the result is clipped at 0.
    """
    m1, m2 = _as_numpy64(mu1, "fid: mu1"), _as_numpy64(mu2, "fid: mu2")
    s1, s2 = _as_numpy64(sigma1, "fid: sigma1"), _as_numpy64(sigma2, "fid: sigma2")
    f = m1.shape[0] if m1.ndim == 1 else -1
    if m1.ndim != 1 or m2.shape != m1.shape or s1.shape != (f, f) or s2.shape != (f, f):
        raise MetricInputError(f"fid: need mu (F,) and sigma (F,F) of equal F, got mu1 {m1.shape}, "
                               f"sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}")
    tr_sqrt, method, residue = _sqrtm_trace(s1, s2, imag_tol)
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return {"fid": max(value, 0.0), "sqrtm_method": method, "imag_residue": residue, "dim": int(f)}


def fid_from_features(a: Any, b: Any) -> float:
    """FID between two feature sets (N, F) and (M, F) (unbiased covariances)."""
    fa = float_matrix(a, "fid: features a", min_rows=2)
    fb = float_matrix(b, "fid: features b", min_rows=2)
    if fa.shape[1] != fb.shape[1]:
        raise MetricInputError(f"fid: feature sets have {fa.shape[1]} and {fb.shape[1]} columns; they must match")
    sa, sb = FeatureStats(fa.shape[1]), FeatureStats(fb.shape[1])
    sa.update(fa)
    sb.update(fb)
    return float(frechet_distance(sa.mean(), sa.cov(), sb.mean(), sb.cov())["fid"])
