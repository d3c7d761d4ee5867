"""Correlation statistics of a study: which latent property tracks gFID, and how sure can we be?

A study has few points (one per variant, often 3-6 per panel), so a single coefficient says little:
every coefficient here comes with a paired bootstrap percentile interval (the (x, y) pairs are resampled
together, so the interval reflects the joint spread of the points), and the rank coefficients
(Spearman, Kendall) are reported next to Pearson because a handful of variants rarely gives a linear
relation. Everything is computed from the stored ``results.json`` dict alone (no model is run), and the
bootstrap is vectorised over resamples, so a full correlation table takes well under a second.

The unit of analysis is the *variant*: runs of one variant at several seeds are averaged first
(:func:`variant_table`), so a variant repeated over seeds does not weigh more than the others; the seed
spread is kept as ``<metric>_sd``. Failed and pending runs are left out of every statistic.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats as sps

from manifold_lab.errors import ManifoldLabError

#: +1: higher is better, -1: lower is better, 0: diagnostic (no better direction).
DIRECTION: dict[str, int] = {
    "SSC": +1, "LPC": -1, "GSQ": +1, "eRank": 0, "eRank/C": 0, "PSNR": +1, "SSIM": +1, "perceptual": -1,
    "rFID": -1, "gFID": -1, "IS": +1, "precision": +1, "recall": +1,
}

#: The metrics the correlation table relates to gFID by default.
DEFAULT_METRICS = ("SSC", "LPC", "GSQ", "eRank", "rFID", "PSNR")

_METHODS = ("pearson", "spearman", "kendall")
_KENDALL_CHUNK_CELLS = 4_000_000  # resamples x n x n sign-matrix cells per chunk (~32 MB of float64)


# --------------------------------------------------------------------------------------------- correlate

def correlate(x: Sequence[Any], y: Sequence[Any], n_boot: int = 2000, seed: int = 0, ci: float = 0.95
              ) -> dict[str, Any]:
    """Pearson, Spearman and Kendall (tau-b) coefficients of paired data with bootstrap percentile CIs.

    Pairs where either value is None or not finite are skipped (``n`` counts the pairs used). With
    fewer than 3 pairs, or when either side is constant, every coefficient is None and ``reason``
    says why ("too few points" / "constant"). Bootstrap resamples in which either side is constant
    are dropped; ``n_boot`` in the result is the number of resamples used, and a CI is None (with
    ``ci_reason``) when too few resamples were usable or ``n_boot`` is 0.
    """
    _check_boot_args(n_boot, ci)
    xs, ys = _paired_finite(x, y)
    n = int(xs.size)
    out: dict[str, Any] = {"n": n, "reason": None, "ci": ci, "n_boot": 0, "ci_reason": None}
    for m in _METHODS:
        out[m] = out[f"{m}_p"] = out[f"{m}_ci"] = None
    if n < 3:
        return {**out, "reason": "too few points", "ci_reason": "too few points"}
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return {**out, "reason": "constant", "ci_reason": "constant"}
    for m, res in (("pearson", sps.pearsonr(xs, ys)), ("spearman", sps.spearmanr(xs, ys)),
                   ("kendall", sps.kendalltau(xs, ys))):
        out[m], out[f"{m}_p"] = _clean(res[0]), _clean(res[1])
    out.update(_bootstrap_cis(xs, ys, n_boot, seed, ci))
    return out


def _check_boot_args(n_boot: int, ci: float) -> None:
    if int(n_boot) != n_boot or n_boot < 0:
        raise ManifoldLabError(f"n_boot must be a non-negative integer, got {n_boot!r}; use e.g. 2000")
    if not 0.0 < float(ci) < 1.0:
        raise ManifoldLabError(f"ci must be a confidence level strictly between 0 and 1, got {ci!r}; use e.g. 0.95")


def _as_float_array(values: Sequence[Any], name: str) -> np.ndarray:
    try:
        return np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    except (TypeError, ValueError) as exc:
        raise ManifoldLabError(f"correlate: {name} must hold numbers or None ({exc}); "
                               "pass the metric values of the variants") from exc


def _paired_finite(x: Sequence[Any], y: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = _as_float_array(x, "x"), _as_float_array(y, "y")
    if xs.shape != ys.shape:
        raise ManifoldLabError(f"correlate: x and y must be paired (same length), got {xs.size} and {ys.size} "
                               "values")
    keep = np.isfinite(xs) & np.isfinite(ys)
    return xs[keep], ys[keep]


def _clean(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _bootstrap_cis(xs: np.ndarray, ys: np.ndarray, n_boot: int, seed: int, ci: float) -> dict[str, Any]:
    """Paired percentile bootstrap of the three coefficients, vectorised over resamples."""
    if n_boot == 0:
        return {"ci_reason": "no bootstrap (n_boot=0)"}
    idx = np.random.default_rng(seed).integers(0, xs.size, size=(n_boot, xs.size))
    xb, yb = xs[idx], ys[idx]
    ok = (np.ptp(xb, axis=1) > 0) & (np.ptp(yb, axis=1) > 0)  # a constant resample has no correlation
    xb, yb = xb[ok], yb[ok]
    used = int(ok.sum())
    if used < max(10, n_boot // 10):
        return {"n_boot": used, "ci_reason": f"only {used} of {n_boot} bootstrap resamples were not constant"}
    boot = {"pearson": _rowwise_pearson(xb, yb),
            "spearman": _rowwise_pearson(sps.rankdata(xb, axis=1), sps.rankdata(yb, axis=1)),
            "kendall": _rowwise_kendall_b(xb, yb)}
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out: dict[str, Any] = {"n_boot": used}
    for m, vals in boot.items():
        q = np.percentile(vals, [lo, hi])
        out[f"{m}_ci"] = [float(np.clip(q[0], -1, 1)), float(np.clip(q[1], -1, 1))]
    return out


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return np.clip((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1)), -1.0, 1.0)


def _rowwise_kendall_b(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b per row: the cosine of the two pairwise sign matrices (ties count as 0)."""
    n = a.shape[1]
    chunk = max(1, _KENDALL_CHUNK_CELLS // (n * n))
    out = np.empty(a.shape[0])
    for s in range(0, a.shape[0], chunk):
        sa = np.sign(a[s:s + chunk, :, None] - a[s:s + chunk, None, :])
        sb = np.sign(b[s:s + chunk, :, None] - b[s:s + chunk, None, :])
        num = (sa * sb).sum((1, 2))
        out[s:s + chunk] = num / np.sqrt((sa * sa).sum((1, 2)) * (sb * sb).sum((1, 2)))
    return np.clip(out, -1.0, 1.0)


# ----------------------------------------------------------------------------------------- variant table

def _metrics_of(run: dict[str, Any]) -> dict[str, Any]:
    return run.get("metrics") or {}


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out.append(float(v))
    return out


def _check_runs(runs: Any) -> list[dict[str, Any]]:
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "label" in r for r in runs):
        raise ManifoldLabError("results['runs'] must be a list of run dicts with a 'label'; regenerate "
                               "results.json with `manifold-lab study run`")
    return runs


def _variant_status(statuses: list[str]) -> str:
    done = statuses.count("done")
    if done == len(statuses):
        return "done"
    if done:
        return "partial"
    return "failed" if "failed" in statuses else "pending"


def variant_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant label (order of first appearance), metrics averaged over its done runs.

    For every metric key ``m`` found in any run: ``m`` (mean over the done seeds that have a finite
    value, None if none) and ``m_sd`` (sample standard deviation, ddof=1; None with fewer than two
    values). ``n_seeds`` counts the done runs; ``status`` is done / partial / failed / pending.
    """
    runs = _check_runs(runs)
    groups: dict[str, list[dict[str, Any]]] = {}
    keys: list[str] = []
    for r in runs:
        groups.setdefault(r["label"], []).append(r)
        keys += [k for k in _metrics_of(r) if k not in keys]
    return [_variant_row(label, members, keys) for label, members in groups.items()]


def _variant_row(label: str, members: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    first = members[0]
    done = [r for r in members if r.get("status") == "done"]
    row: dict[str, Any] = {
        "label": label, "tokenizer": first.get("tokenizer"), "panels": list(first.get("panels") or []),
        "x": first.get("x"), "set": list(first.get("set") or []),
        "status": _variant_status([r.get("status", "pending") for r in members]),
        "n_seeds": len(done), "seeds": [r.get("seed") for r in done], "n_runs": len(members),
    }
    for k in keys:
        vals = _finite(_metrics_of(r).get(k) for r in done)
        row[k] = float(np.mean(vals)) if vals else None
        row[f"{k}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return row


# ------------------------------------------------------------------------------------- correlation table

def expected_sign(metric: str, target: str = "gFID") -> str:
    """The sign of corr(metric, target) if the better metric goes with the better target ("" if unknown)."""
    s = DIRECTION.get(metric, 0) * DIRECTION.get(target, 0)
    return "+" if s > 0 else "-" if s < 0 else ""


def _agrees(rho: float | None, expected: str) -> bool | None:
    if rho is None or not expected:
        return None
    return rho < 0 if expected == "-" else rho > 0


def _panels(results: dict[str, Any]) -> list[dict[str, Any]]:
    study = results.get("study") or {}
    return [p for p in (study.get("panels") or []) if isinstance(p, dict) and p.get("name")]


def correlation_table(results: dict[str, Any], metrics: Sequence[str] = DEFAULT_METRICS, target: str = "gFID",
                      n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> list[dict[str, Any]]:
    """One row per (metric, subset): subset "all" (every variant, seed-averaged) and each declared panel.

    A panel's own metric is added to ``metrics`` when missing, so every panel's headline relation
    is in the table. Each row holds metric, subset, target, n, the :func:`correlate` fields, the
    expected sign (``"-"``, ``"+"`` or ``""``) and ``agrees`` (does the Spearman sign match it; None
    when there is no expectation or no coefficient).
    """
    if not isinstance(results, dict):
        raise ManifoldLabError("correlation_table needs the results dict (results.json), got "
                               f"{type(results).__name__}")
    table = variant_table(results.get("runs"))
    panels = _panels(results)
    names = list(dict.fromkeys([*metrics, *(p.get("metric") for p in panels if p.get("metric"))]))
    subsets = [("all", table)] + [(p["name"], [r for r in table if p["name"] in r["panels"]]) for p in panels]
    rows = []
    for metric in names:
        for subset, members in subsets:
            c = correlate([r.get(metric) for r in members], [r.get(target) for r in members],
                          n_boot=n_boot, seed=seed, ci=ci)
            exp = expected_sign(metric, target)
            rows.append({"metric": metric, "subset": subset, "target": target, **c, "expected": exp,
                         "agrees": _agrees(c["spearman"], exp)})
    return rows


__all__ = ["DEFAULT_METRICS", "DIRECTION", "correlate", "correlation_table", "expected_sign", "variant_table"]
