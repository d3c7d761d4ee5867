"""Effective rank of pooled latents (Roy & Vetterli 2007), a diagnostic of how many directions
the latent space actually uses.

The spec (specs/metrics.md) defines eRank on the singular values of the pooled feature matrix
F (N x C) *as given*: no centring. A large common offset therefore shows up as one dominant
singular value and lowers eRank; that is intended (it is what a diffusion model sees) and is
why we do not centre here.
"""

from __future__ import annotations

from typing import Any

import torch

from manifold_lab.metrics._inputs import MetricInputError, float_matrix


def _singular_values(f: torch.Tensor) -> torch.Tensor:
    """Singular values of ``f`` (float64).

    For tall matrices (N much larger than C, e.g. 50k x 1k) the C x C Gram matrix is far cheaper
    in time and memory than an SVD of F. Its eigenvalues are sigma_i^2; singular values below
    ~1e-8 * sigma_max lose precision that way, but they carry a negligible share of the entropy.
    """
    n, c = f.shape
    if n > 4 * c:
        ev = torch.linalg.eigvalsh(f.T @ f)
        return ev.clamp_min(0).sqrt().flip(0)
    return torch.linalg.svdvals(f)


def effective_rank(features: Any) -> float:
    """exp(entropy of the normalised singular values) of ``features`` (N, C); not centred.

    Between 1 (rank one) and min(N, C) (all singular values equal).
    """
    f = float_matrix(features, "erank: features")
    s = _singular_values(f)
    total = s.sum()
    if not bool(total > 0):
        raise MetricInputError("erank: features are all zero; the effective rank is undefined")
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()).item())


def erank_report(features: Any) -> dict[str, Any]:
    """eRank, eRank / C (as the paper plots it), and the matrix size it was computed on."""
    f = float_matrix(features, "erank: features")
    value = effective_rank(f)
    n, c = f.shape
    return {"erank": value, "erank_normalized": value / c, "n": int(n), "channels": int(c), "centered": False}
