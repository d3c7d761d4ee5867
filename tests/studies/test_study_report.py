"""The study report: every file is written from a results dict alone, failed and pending runs included."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from manifold_lab.errors import ManifoldLabError
from manifold_lab.reports.study_report import (correlation_heatmap, panel_figure, seed_spread_table,
                                               write_study_report)
from manifold_lab.studies.stats import correlation_table

PNG = b"\x89PNG\r\n\x1a\n"
STAGES = ["tokenizer", "measure", "cache_latents", "train_dit", "sample", "evaluate"]


def _results(panels: bool = True) -> dict:
    """A small study: a monotone 3-point width panel (one variant repeated over two seeds), a non-monotone
    3-point SSR panel, an SCR panel with one done and one failed variant, a pending run and a done run
    whose metrics were never recorded."""
    specs = [  # label, seed, panel, x, SSC, rFID, gFID
        ("VAE C=2", 0, "width", 2, 0.20, 70.0, 150.0), ("VAE C=4", 0, "width", 4, 0.30, 60.0, 130.0),
        ("VAE C=4", 1, "width", 4, 0.34, 62.0, 136.0), ("VAE C=8", 0, "width", 8, 0.45, 50.0, 120.0),
        ("PAE SSR=0", 0, "ssr", 0, 0.21, 40.0, 110.0), ("PAE SSR=0.2", 0, "ssr", 0.2, 0.25, 41.0, 100.0),
        ("PAE SSR=0.4", 0, "ssr", 0.4, 0.26, 45.0, 108.0), ("PAE SCR=1", 0, "scr", 1, 0.22, 42.0, 104.0),
    ]
    runs = []
    for label, seed, panel, x, ssc, rfid, gfid in specs:
        runs.append(_run(label, seed, [panel], x, {"SSC": ssc, "SSC_std": 0.1, "LPC": 0.3, "GSQ": 0.6 + ssc,
                                                   "eRank": 5.0, "eRank/C": 0.6, "PSNR": 20 + 10 * ssc,
                                                   "rFID": rfid, "gFID": gfid, "IS": 3.0, "precision": 0.3,
                                                   "recall": 0.1}))
    runs.append(_run("PAE SCR=4", 0, ["scr"], 4, {"SSC": 0.5, "rFID": None}, status="failed",
                     error="train_dit: RuntimeError: out of memory", stages=STAGES[:3]))
    runs.append(_run("PAE all", 0, [], None, None, status="pending", stages=[]))
    runs.append(_run("PAE odd", 0, [], None, {"gFID": 99.0}))  # done, but geometry never recorded
    runs[-1].pop("metrics")
    study = {"name": "mini", "title": "Mini study", "caption": "A tiny synthetic study.", "default_budget": "cpu",
             "stages": STAGES, "seeds": [0],
             "budgets": {"cpu": {"gfid": "cpu", "gfid_set": [], "measure_set": [], "tokenizer_set": {},
                                 "note": "synthetic budget note"}},
             "panels": [{"name": "width", "title": "(a) width", "metric": "rFID", "x_label": "C"},
                        {"name": "ssr", "title": "(b) SSR weight", "metric": "SSC", "x_label": "w_SSR"},
                        {"name": "scr", "title": "(d) SCR weight", "metric": "GSQ", "x_label": "w_SCR"}]
             if panels else [],
             "variants": [{"label": "VAE C=4", "tokenizer": "vae", "set": [], "panels": ["width"], "x": 4,
                           "seeds": [0, 1], "note": ""}]}
    return {"study": study, "budget": "cpu", "created": "2026-11-23T12:00:00+0000",
            "commands": {"run": "manifold-lab study run studies/mini.yaml", "report": "manifold-lab report mini"},
            "runs": runs}


def _run(label, seed, panels, x, metrics, *, status="done", error=None, stages=STAGES) -> dict:
    return {"run_id": f"{label.lower().replace(' ', '-')}-s{seed}", "label": label, "slug": label.lower(),
            "seed": seed, "tokenizer": "vae" if label.startswith("VAE") else "pae", "set": [], "panels": panels,
            "x": x, "status": status, "error": error, "latent_shape": [4, 8, 8],
            "stage_seconds": {s: 60.0 * (i + 1) for i, s in enumerate(stages)}, "metrics": metrics}


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    """One full report, shared by the tests that only read it (drawing the figures takes seconds)."""
    results = _results()
    return results, write_study_report(results, tmp_path_factory.mktemp("study-report") / "out")


def test_the_report_writes_every_file_and_mentions_every_run(report) -> None:
    results, path = report
    out = path.parent
    assert path.name == "report.md"
    for fig in ("panels", "profile", "correlations"):
        assert _is_png(out / "figures" / f"{fig}.png"), fig
    md = path.read_text()
    for label in {r["label"] for r in results["runs"]}:
        assert label in md
    assert "train_dit: RuntimeError: out of memory" in md and "pending" in md
    assert md.startswith("# Mini study") and "synthetic budget note" in md
    assert "*Figure 1:" in md and "figures/panels.png" in md and "figures/correlations.png" in md
    assert "manifold-lab study run studies/mini.yaml" in md and "manifold-lab report mini" in md
    # wall time: 10 runs with a tokenizer stage of 1 min each (the pending one has none) -> total 10.0 min
    total = next(line for line in md.splitlines() if line.startswith("| **total**"))
    assert total.split("|")[2].strip() == "**10.0**"
    # the median row skips unfinished stages: stage i takes i min wherever it ran, so one run's sum is 21 min
    median = next(line for line in md.splitlines() if line.startswith("| *median*"))
    assert [c.strip() for c in median.split("|")[2:-1]] == ["*1.0*", "*2.0*", "*3.0*", "*4.0*", "*5.0*", "*6.0*",
                                                            "*21.0*"]

    rows = json.loads((out / "correlations.json").read_text())
    assert rows == json.loads(json.dumps(correlation_table(results)))
    with open(out / "correlations.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    assert {"metric", "subset", "n", "spearman", "spearman_ci_lo", "agrees"} <= set(table[0])


def test_the_findings_say_when_n_is_too_small_or_the_interval_includes_zero(report) -> None:
    md = report[1].read_text()
    findings = md.split("## What the data show")[1].split("## Reproduce")[0]
    width = next(line for line in findings.splitlines() if "(a) width" in line)
    assert "n = 3" in width and "Spearman ρ = +1.00" in width and "and it is." in width and "fragile" in width
    assert "reconstruction does not predict generation" in width and "neither support nor refute" in width
    ssr = next(line for line in findings.splitlines() if "(b) SSR weight" in line)
    assert "n = 3" in ssr and "Spearman ρ = -0.50" in ssr and "CI includes 0" in ssr
    scr = next(line for line in findings.splitlines() if "(d) SCR weight" in line)
    assert "too few" in scr and "n = 1" in scr  # the failed SCR=4 run is not a point
    assert "left out of every statistic" in findings


@pytest.mark.parametrize("rho, verdict", [(-0.9, "these data agree with it"),
                                          (+0.9, "contrary to that claim"),
                                          (-0.2, "establish no relation")])
def test_the_rfid_sentence_reads_a_trade_off_as_support_for_the_papers_claim(rho, verdict) -> None:
    """The paper claims rFID does not predict gFID: better rFID with worse gFID (rho < 0) supports it."""
    from manifold_lab.reports.study_report import _panel_sentence
    ci = [rho - 0.1, min(rho + 0.1, 1.0)] if abs(rho) > 0.5 else [-0.8, 0.6]
    row = {"metric": "rFID", "n": 6, "spearman": rho, "spearman_ci": ci, "pearson": rho, "ci": 0.95,
           "expected": "+", "agrees": rho > 0}
    text = _panel_sentence({"name": "width", "title": "(a) width", "metric": "rFID"}, row)
    assert verdict in text and "n = 6" in text


def test_seed_spread_covers_only_variants_with_several_done_seeds() -> None:
    spread = seed_spread_table(_results())
    assert {s["label"] for s in spread} == {"VAE C=4"}
    gfid = next(s for s in spread if s["metric"] == "gFID")
    assert gfid["mean"] == pytest.approx(133.0) and gfid["sd"] == pytest.approx(4.242640687)
    assert (gfid["min"], gfid["max"], gfid["seeds"]) == (130.0, 136.0, [0, 1])


def test_missing_metrics_and_no_panels_do_not_crash(tmp_path) -> None:
    results = _results(panels=False)
    for r in results["runs"][:4]:
        r["metrics"] = {"gFID": None}
    assert panel_figure(results, tmp_path / "p.png") is None and not (tmp_path / "p.png").exists()
    md = write_study_report(results, tmp_path / "out").read_text()
    assert not (tmp_path / "out" / "figures" / "panels.png").exists()
    assert _is_png(tmp_path / "out" / "figures" / "profile.png")
    assert "declares no panels" in md and "*Figure 1:" in md and "*Figure 3:" not in md
    assert "not in one controlled factor" in md and "per-panel rows" not in md


def test_bad_input_raises_one_clear_error(tmp_path) -> None:
    with pytest.raises(ManifoldLabError, match="results dict"):
        write_study_report({"study": {}}, tmp_path)
    with pytest.raises(ManifoldLabError, match="no correlation rows"):
        correlation_heatmap([], tmp_path / "c.png")
