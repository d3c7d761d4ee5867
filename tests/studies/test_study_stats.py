"""Correlation statistics of a study: coefficients, paired bootstrap intervals, seed averaging, the table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from manifold_lab.errors import ManifoldLabError
from manifold_lab.studies.stats import (_rowwise_kendall_b, _rowwise_pearson, correlate, correlation_table,
                                        expected_sign, variant_table)


def _run(label: str, seed: int, metrics: dict | None, *, status: str = "done", panels=(), x=None) -> dict:
    return {"run_id": f"{label}-s{seed}", "label": label, "seed": seed, "tokenizer": "pae", "set": [],
            "panels": list(panels), "x": x, "status": status,
            "error": "train_dit: boom" if status == "failed" else None,
            "stage_seconds": {}, "metrics": metrics}


def _results(runs: list[dict], panels: list[dict]) -> dict:
    return {"study": {"name": "t", "panels": panels, "stages": ["tokenizer"]}, "budget": "smoke", "runs": runs}


# ------------------------------------------------------------------------------------------- correlate

def test_a_monotone_pair_has_rank_correlation_one_and_intervals_inside_the_unit_range() -> None:
    x = [1, 2, 3, 4, 5, 6]
    c = correlate(x, [v ** 3 for v in x], n_boot=500)
    assert c["n"] == 6 and c["reason"] is None
    assert c["spearman"] == pytest.approx(1.0) and c["kendall"] == pytest.approx(1.0)
    assert 0.9 < c["pearson"] < 1.0  # monotone but not linear
    for m in ("pearson", "spearman", "kendall"):
        lo, hi = c[f"{m}_ci"]
        assert -1.0 <= lo <= hi <= 1.0
        assert lo <= c[m] + 1e-12 and c[m] <= hi + 1e-12
    assert c["spearman_ci"] == pytest.approx([1.0, 1.0])  # every non-constant resample is still monotone
    assert 0 < c["n_boot"] <= 500


def test_coefficients_match_scipy_and_the_bootstrap_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=12)
    y = x + rng.normal(size=12)
    c = correlate(x, y, n_boot=300, seed=7)
    assert c["pearson"] == pytest.approx(sps.pearsonr(x, y)[0])
    assert c["spearman"] == pytest.approx(sps.spearmanr(x, y)[0])
    assert c["kendall"] == pytest.approx(sps.kendalltau(x, y)[0])
    assert correlate(x, y, n_boot=300, seed=7)["spearman_ci"] == c["spearman_ci"]
    assert correlate(x, y, n_boot=300, seed=8)["spearman_ci"] != c["spearman_ci"]


def test_vectorised_bootstrap_statistics_equal_scipy_on_resamples_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(40, 7)).astype(float)  # many ties, like resamples with repeated points
    b = rng.normal(size=(40, 7))
    b[:, 1] = b[:, 2]
    tau = _rowwise_kendall_b(a, b)
    rho = _rowwise_pearson(sps.rankdata(a, axis=1), sps.rankdata(b, axis=1))
    for i in range(40):
        ref_tau, ref_rho = sps.kendalltau(a[i], b[i])[0], sps.spearmanr(a[i], b[i])[0]
        if math.isnan(ref_tau):
            continue
        assert tau[i] == pytest.approx(ref_tau) and rho[i] == pytest.approx(ref_rho)


def test_n_counts_only_finite_pairs() -> None:
    c = correlate([1, 2, None, 4, float("nan"), 6, 7], [2, 1, 3, float("inf"), 5, 7, 9], n_boot=50)
    assert c["n"] == 4  # (1,2) (2,1) (6,7) (7,9)
    assert c["spearman"] == pytest.approx(sps.spearmanr([1, 2, 6, 7], [2, 1, 7, 9])[0])


def test_too_few_points_and_constant_input_give_none_with_a_reason() -> None:
    few = correlate([1, 2, None], [3, 4, 5])
    assert few["n"] == 2 and few["reason"] == "too few points"
    assert all(few[k] is None for k in ("pearson", "spearman", "kendall", "pearson_ci", "spearman_ci", "kendall_ci"))
    const = correlate([1, 1, 1, 1], [1, 2, 3, 4])
    assert const["n"] == 4 and const["reason"] == "constant" and const["spearman"] is None
    assert correlate([1, 2, 3], [5, 5, 5])["reason"] == "constant"


def test_degenerate_bootstrap_resamples_are_dropped_without_crashing() -> None:
    c = correlate([0, 0, 1], [1, 2, 3], n_boot=400)  # most resamples of 3 points have a constant side
    assert c["spearman"] is not None and c["n"] == 3
    assert c["n_boot"] < 400
    if c["spearman_ci"] is None:
        assert c["ci_reason"]
    else:
        assert -1 <= c["spearman_ci"][0] <= c["spearman_ci"][1] <= 1
    none = correlate([1, 2, 3], [3, 1, 2], n_boot=0)
    assert none["spearman"] is not None and none["spearman_ci"] is None and "n_boot=0" in none["ci_reason"]


def test_bad_input_raises_one_clear_error() -> None:
    with pytest.raises(ManifoldLabError, match="same length"):
        correlate([1, 2, 3], [1, 2])
    with pytest.raises(ManifoldLabError, match="ci must"):
        correlate([1, 2, 3], [1, 2, 3], ci=1.5)
    with pytest.raises(ManifoldLabError, match="numbers or None"):
        correlate(["a", 2, 3], [1, 2, 3])
    with pytest.raises(ManifoldLabError, match="runs"):
        variant_table("not runs")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- variant table

def test_variant_table_averages_done_seeds_and_gives_the_sample_sd() -> None:
    runs = [_run("A", 0, {"gFID": 10.0, "SSC": 0.1}), _run("B", 0, {"gFID": 5.0, "SSC": None}),
            _run("A", 1, {"gFID": 12.0, "SSC": 0.3}), _run("A", 2, {"gFID": 14.0}),
            _run("C", 0, None, status="failed"),
            _run("D", 0, {"gFID": 7.0}), _run("D", 1, {"gFID": 100.0}, status="failed"),
            _run("E", 0, {}, status="pending")]
    table = variant_table(runs)
    assert [r["label"] for r in table] == ["A", "B", "C", "D", "E"]
    a, b, c, d, e = table
    assert a["gFID"] == pytest.approx(12.0) and a["gFID_sd"] == pytest.approx(2.0) and a["n_seeds"] == 3
    assert a["SSC"] == pytest.approx(0.2) and a["SSC_sd"] == pytest.approx(math.sqrt(0.02))
    assert a["status"] == "done" and a["seeds"] == [0, 1, 2]
    assert b["gFID"] == 5.0 and b["gFID_sd"] is None and b["SSC"] is None
    assert c["status"] == "failed" and c["n_seeds"] == 0 and c["gFID"] is None and c["SSC"] is None
    assert d["status"] == "partial" and d["gFID"] == 7.0 and d["n_seeds"] == 1  # the failed seed is left out
    assert e["status"] == "pending" and e["gFID"] is None


# ----------------------------------------------------------------------------------- correlation table

def _sweep_results() -> dict:
    panels = [{"name": "ssr", "title": "(b) SSR", "metric": "SSC", "x_label": "w"},
              {"name": "width", "title": "(a) width", "metric": "SSIM", "x_label": "C"}]
    runs = []
    for i, w in enumerate([0.0, 0.1, 0.2, 0.4]):  # SSC up -> gFID down, as the paper expects
        runs.append(_run(f"P{i}", 0, {"SSC": 0.2 + w, "LPC": 0.3, "GSQ": 0.5 + w, "eRank": 3 + i, "rFID": 50 + i,
                                      "PSNR": 20 + i, "SSIM": 0.5, "gFID": 100 - 10 * i}, panels=["ssr"], x=w))
    for i, c in enumerate([2, 4]):
        runs.append(_run(f"V{c}", 0, {"SSC": 0.1, "rFID": 80 - c, "SSIM": 0.5 + 0.1 * i, "gFID": 120 - c},
                         panels=["width"], x=c))
    runs.append(_run("Vbad", 0, None, status="failed", panels=["width"], x=8))
    return _results(runs, panels)


def test_correlation_table_has_an_all_row_per_metric_and_a_row_per_panel() -> None:
    rows = correlation_table(_sweep_results(), n_boot=200)
    metrics = ["SSC", "LPC", "GSQ", "eRank", "rFID", "PSNR", "SSIM"]  # SSIM added: a panel's own metric
    assert list(dict.fromkeys(r["metric"] for r in rows)) == metrics
    assert [(r["metric"], r["subset"]) for r in rows] == [(m, s) for m in metrics for s in ("all", "ssr", "width")]
    cell = {(r["metric"], r["subset"]): r for r in rows}
    assert cell[("SSC", "all")]["n"] == 6 and cell[("SSC", "ssr")]["n"] == 4
    ssc = cell[("SSC", "ssr")]
    assert ssc["spearman"] == pytest.approx(-1.0) and ssc["expected"] == "-" and ssc["agrees"] is True
    assert cell[("rFID", "ssr")]["expected"] == "+" and cell[("rFID", "ssr")]["agrees"] is False
    assert cell[("eRank", "ssr")]["expected"] == "" and cell[("eRank", "ssr")]["agrees"] is None
    assert cell[("LPC", "ssr")]["reason"] == "constant" and cell[("LPC", "ssr")]["agrees"] is None
    width = cell[("SSIM", "width")]  # the failed variant is not a point
    assert width["n"] == 2 and width["reason"] == "too few points" and width["spearman"] is None
    assert all(r["target"] == "gFID" for r in rows)


def test_expected_signs_follow_the_better_directions() -> None:
    assert [expected_sign(m) for m in ("SSC", "LPC", "GSQ", "PSNR", "rFID", "eRank", "eRank/C", "unknown")] == \
        ["-", "+", "-", "-", "+", "", "", ""]
    assert expected_sign("SSC", target="IS") == "+"  # a higher-better target flips the sign
