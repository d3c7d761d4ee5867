"""The shipped studies (studies/pilot.yaml, studies/zoo.yaml) run end to end at their smoke budget."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["pilot", "zoo"])
def test_smoke_budget_runs_every_stage_of_every_run(name, tmp_path) -> None:
    work, out = tmp_path / "work", tmp_path / "report"
    cmd = [sys.executable, "-m", "manifold_lab.cli", "study", "run", str(REPO / "studies" / f"{name}.yaml"),
           "--budget", "smoke", "--work", str(work), "--out", str(out), "--no-progress",
           "--set", "executor.workers=2"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert rows and all(r["status"] == "done" for r in rows), [(r["run_id"], r["error"]) for r in rows]
    for r in rows:
        for col in ("SSC", "LPC", "GSQ", "eRank", "PSNR", "rFID", "gFID"):
            assert math.isfinite(float(r[col])), (r["run_id"], col)
    report = (out / "report.md").read_text()
    assert all(r["label"] in report for r in rows)
    for fig in ("profile.png", "correlations.png") + (("panels.png",) if name == "pilot" else ()):
        assert (out / "figures" / fig).stat().st_size > 10_000, fig
