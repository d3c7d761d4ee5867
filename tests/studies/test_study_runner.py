"""The study engine end to end at a seconds-long budget: resume, failure isolation, kill -9, executors, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from manifold_lab.studies import stages as stages_mod
from manifold_lab.studies.config import load_study
from manifold_lab.studies.executors import run_all, torchrun_stage_fn
from manifold_lab.studies.runner import collect_results, execute_run, results_csv
from manifold_lab.studies.stages import RunContext
from study_helpers import SMOKE_BUDGET, tiny_study

pytestmark = pytest.mark.slow


def _stage_files(work: Path) -> dict[str, float]:
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.glob("stages/*/*/stage.json")}


def test_a_rerun_does_only_what_is_missing_and_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch,
                                                                                     one_thread) -> None:
    study = load_study(tiny_study(tmp_path))
    work = tmp_path / "work"
    real = stages_mod.RUNNERS["cache_latents"]

    def broken(ctx, folder):
        if ctx.run.variant.label == "VAE C=2":
            raise RuntimeError("disk on fire\nsecond line")
        return real(ctx, folder)

    monkeypatch.setitem(stages_mod.RUNNERS, "cache_latents", broken)
    records = run_all(study, "smoke", work, study.runs(), study.executor, progress=False)
    assert [r["status"] for r in records] == ["failed", "done"]
    assert records[0]["error"] == "cache_latents: RuntimeError: disk on fire"
    res = collect_results(study, "smoke", work)
    by = {r["run_id"]: r for r in res["runs"]}
    assert by["vae-c2-s0"]["status"] == "failed" and "disk on fire" in by["vae-c2-s0"]["error"]
    assert set(by["vae-c2-s0"]["stage_seconds"]) == {"tokenizer", "measure"}  # what finished before the failure
    assert by["vae-c4-s0"]["status"] == "done" and by["vae-c4-s0"]["metrics"]["gFID"] > 0
    assert by["vae-c4-s0"]["metrics"]["SSC"] is not None and by["vae-c4-s0"]["metrics"]["rFID"] is not None

    # fixed: the rerun computes only the failed run's missing stages
    monkeypatch.setitem(stages_mod.RUNNERS, "cache_latents", real)
    before = _stage_files(work)
    calls: list[str] = []
    for name, fn in list(stages_mod.RUNNERS.items()):
        monkeypatch.setitem(stages_mod.RUNNERS, name,
                            lambda ctx, folder, fn=fn, name=name:
                            calls.append(f"{ctx.run.run_id}:{name}") or fn(ctx, folder))
    records = run_all(study, "smoke", work, study.runs(), study.executor, progress=False)
    assert [r["status"] for r in records] == ["done", "done"]
    assert calls == [f"vae-c2-s0:{s}" for s in ("cache_latents", "train_dit", "sample", "evaluate")]
    after = _stage_files(work)
    assert all(after[k] == v for k, v in before.items())  # finished stages were not rewritten

    table = list(csv.DictReader(results_csv(collect_results(study, "smoke", work)).splitlines()))
    assert [r["run_id"] for r in table] == ["vae-c2-s0", "vae-c4-s0"]
    assert [r["model.z_channels"] for r in table] == ["2", "4"] and all(float(r["gFID"]) > 0 for r in table)
    assert all(float(r["train_dit_s"]) >= 0 for r in table)


def test_a_killed_study_resumes_without_redoing_finished_stages(tmp_path) -> None:
    """kill -9 the CLI while the DiT trains; the rerun reuses every finished stage and resumes the DiT."""
    budget = {**SMOKE_BUDGET, "gfid_set": [*SMOKE_BUDGET["gfid_set"], "train.steps=400", "train.ckpt_every=10",
                                           "train.batch_size=8"]}
    path = tiny_study(tmp_path, budgets={"smoke": budget})
    work, out = tmp_path / "work", tmp_path / "report"
    cmd = [sys.executable, "-m", "manifold_lab.cli", "study", "run", str(path), "--work", str(work),
           "--out", str(out), "--no-progress", "--only", "VAE C=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ckpts = work / "stages" / "train_dit"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(ckpts.glob("*/run/checkpoints/*/*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the study finished before it could be killed: " + proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _stage_files(work)
    assert {k.split("/")[1] for k in done_before} == {"tokenizer", "measure", "cache_latents"}
    assert not out.exists()  # nothing reported as complete

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    log = rerun.stdout + rerun.stderr
    for stage in ("tokenizer", "measure", "cache_latents"):
        assert f"vae-c2-s0: {stage} (stored)" in log
    assert "vae-c2-s0: train_dit done" in log
    after = _stage_files(work)
    assert all(after[k] == v for k, v in done_before.items())
    dit_log = next((work / "stages" / "train_dit").glob("*/run/metrics.jsonl")).read_text().splitlines()
    steps = [json.loads(line)["step"] for line in dit_log]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # resumed, not restarted: no step logged twice
    res = json.loads((out / "results.json").read_text())
    by = {r["run_id"]: r["status"] for r in res["runs"]}
    assert by == {"vae-c2-s0": "done", "vae-c4-s0": "pending"}
    for f in ("results.csv", "report.md", "stages/vae-c2-s0/train_dit.json", "stages/vae-c2-s0/measure_metrics.json"):
        assert (out / f).is_file(), f

    base = [sys.executable, "-m", "manifold_lab.cli"]
    status = subprocess.run([*base, "study", "status", str(path), "--work", str(work)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "1/2 runs done" in status.stdout, status.stdout + status.stderr
    (out / "report.md").unlink()
    rep = subprocess.run([*base, "report", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0 and "VAE C=2" in (out / "report.md").read_text(), rep.stderr
    bad = subprocess.run([*base, "report", str(tmp_path / "nothing")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "no stored results" in bad.stderr


def test_local_workers_torchrun_and_submitit_give_the_same_records(tmp_path) -> None:
    """Each executor completes the runs; stages already done by one executor are reused by the others."""
    work = tmp_path / "work"
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        pool = load_study(tiny_study(tmp_path, name="pool", executor={"kind": "local", "workers": 2}))
        recs = run_all(pool, "smoke", work, pool.runs(), pool.executor, progress=False)
        assert [r["status"] for r in recs] == ["done", "done"]
        done = _stage_files(work)
        assert len(done) == 12  # 2 runs x 6 stages, computed once each

        # torchrun with 2 processes on a new seed: the first stages run here (keys do not depend on which
        # stages a study lists), the DiT under torchrun with DDP, then sampling and evaluation here again
        first = load_study(tiny_study(tmp_path, name="first", seeds=[1], stages=["cache_latents"]))
        run_all(first, "smoke", work, first.runs(["VAE C=2"]), first.executor, progress=False)
        tr = load_study(tiny_study(tmp_path, name="tr", seeds=[1], stages=["train_dit"],
                                   executor={"kind": "torchrun", "nproc_per_node": 2}))
        recs = run_all(tr, "smoke", work, tr.runs(["VAE C=2"]), tr.executor, progress=False)
        assert [r["status"] for r in recs] == ["done"], recs
        rest = load_study(tiny_study(tmp_path, name="rest", seeds=[1]))  # sampling and evaluation here
        recs = run_all(rest, "smoke", work, rest.runs(["VAE C=2"]), rest.executor, progress=False)
        ctx = RunContext(study=rest, budget_name="smoke", run=rest.runs()[0], work=work)
        assert ctx.record("cache_latents")["world_size"] == 1 and ctx.record("train_dit")["world_size"] == 2
        assert [r["status"] for r in recs] == ["done"] and ctx.record("evaluate")["result"]["gfid"] > 0

        # submitit's local executor: one job per run; the seed-0 stages are reused, seed 2 is new
        sub = load_study(tiny_study(tmp_path, name="sub", seeds=[0, 2], executor={
            "kind": "submitit", "cluster": "local", "folder": str(tmp_path / "jobs"), "timeout_min": 10}))
        recs = run_all(sub, "smoke", work, sub.runs(["VAE C=4"]), sub.executor, progress=False)
        assert [r["status"] for r in recs] == ["done", "done"], recs
        assert all(v == _stage_files(work)[k] for k, v in done.items())
        assert any((tmp_path / "jobs").iterdir())  # submitit's job logs
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads


def test_torchrun_stage_errors_come_back_in_one_line(tmp_path) -> None:
    study = load_study(tiny_study(tmp_path, stages=["tokenizer"]))
    study.variants[0].set = ["model.z_chanels=2"]  # not validated here: fails inside the torchrun stage
    rec = execute_run(study, "smoke", tmp_path / "w", study.runs()[0], stage_fn=torchrun_stage_fn("smoke", 1))
    assert rec["status"] == "failed" and rec["error"].startswith("tokenizer: ") and "\n" not in rec["error"]
    assert "z_chanels" in rec["error"]


def test_cli_exits_non_zero_and_names_the_failed_run(tmp_path) -> None:
    path = tiny_study(tmp_path, stages=["tokenizer"])
    data = yaml.safe_load(path.read_text())
    data["variants"][0]["set"].append(f"data.name={tmp_path / 'no-such-images'}")  # found only when it trains
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "manifold_lab.cli", "study", "run", str(path), "--work",
                           str(tmp_path / "w"), "--out", str(tmp_path / "rep"), "--no-progress"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "failed vae-c2-s0: tokenizer:" in " ".join(proc.stderr.split()) and "no-such-images" in proc.stderr
    rows = list(csv.DictReader((tmp_path / "rep" / "results.csv").read_text().splitlines()))
    assert [r["status"] for r in rows] == ["failed", "done"]
