"""Run a study's (variant, seed) runs, record failures without stopping, and collect the tidy results.

``execute_run`` walks one run's stages (:mod:`manifold_lab.studies.stages`); an exception in a stage
marks that run failed in its run record (one line plus the traceback) and the next run starts, so one
bad variant never costs the others. ``collect_results`` reads only stored records (``stage.json`` and
run records) and builds the dict that ``results.json`` holds and every report is drawn from;
``write_study_results`` writes it with the tidy table (``results.csv``: one row per run, every
metric, gFID, rFID, each stage's wall time and a column per overridden config key) and each stage's
own JSON, then the report (:mod:`manifold_lab.reports.study_report`).

Folders::

    <work>/stages/<stage>/<key>/            stage outputs (shared by every study using this work folder)
    <work>/runs/<study>-<budget>/<run>.json  what happened to each run (status, error, stage keys)
    <reports>/                               results.json, results.csv, stages/<run>/<stage>.json, report
"""

from __future__ import annotations

import csv
import io
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from manifold_lab import distributed
from manifold_lab.config import parse_override, to_dict
from manifold_lab.io import write_json, write_text
from manifold_lab.studies.config import RunSpec, StudyConfig
from manifold_lab.studies.stages import STAGE_FILE, RunContext, read_stage_record, run_stage

Notify = Callable[[str], None]

#: results.csv metric columns, in order (the measure summary, then generation)
METRIC_COLUMNS = ("SSC", "SSC_std", "LPC", "GSQ", "GSQ_std", "eRank", "eRank/C", "PSNR", "SSIM", "perceptual",
                  "rFID", "gFID", "IS", "precision", "recall")


def run_record_path(work: Path, study: StudyConfig, budget: str, run: RunSpec) -> Path:
    return Path(work) / "runs" / f"{study.name}-{budget}" / f"{run.run_id}.json"


def execute_run(study: StudyConfig, budget: str, work: str | Path, run: RunSpec, *, progress: bool = False,
                notify: Notify | None = None, stage_fn: Callable[[RunContext, str], Any] | None = None
                ) -> dict[str, Any]:
    """Run every missing stage of ``run``; returns (and stores) its run record, failed or done.

    ``stage_fn(ctx, stage)`` runs one stage (default: in this process; the torchrun executor passes
    one that launches ``torchrun``).
    """
    work = Path(work)
    ctx = RunContext(study=study, budget_name=budget, run=run, work=work, progress=progress)
    stage_fn = stage_fn or run_stage
    say = notify or (lambda msg: None)
    record: dict[str, Any] = {"run_id": run.run_id, "label": run.variant.label, "seed": run.seed,
                              "budget": budget, "status": "running", "error": None, "stage_keys": {}}
    current = ""
    started = time.perf_counter()
    try:
        record["stage_keys"] = {s: ctx.key(s) for s in study.stages}
        for stage in study.stages:
            current = stage
            was_done = ctx.record(stage) is not None
            t0 = time.perf_counter()
            stage_fn(ctx, stage)
            if ctx.record(stage) is None:
                raise RuntimeError(f"stage {stage} finished without writing {ctx.folder(stage) / STAGE_FILE}")
            say(f"{run.run_id}: {stage} " + ("(stored)" if was_done else f"done in {time.perf_counter() - t0:.0f} s"))
        record["status"] = "done"
    except Exception as exc:  # noqa: BLE001 -- a failed run is recorded, the study goes on
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        record.update(status="failed", error=f"{current}: {type(exc).__name__}: {first}",
                      traceback=traceback.format_exc(limit=12))
        say(f"{run.run_id}: FAILED in {current}: {first}")
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if distributed.is_main_process():
        write_json(run_record_path(work, study, budget, run), record)
    return record


# ---------------------------------------------------------------------------------------------
# results


def collect_results(study: StudyConfig, budget: str, work: str | Path, commands: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """The ``results.json`` dict of the study, from stored records only (nothing is computed)."""
    import json

    work = Path(work)
    runs = []
    for run in study.runs():
        ctx = RunContext(study=study, budget_name=budget, run=run, work=work)
        records = {s: ctx.record(s) for s in study.stages}
        path = run_record_path(work, study, budget, run)
        run_rec = json.loads(path.read_text()) if path.is_file() else {}
        if all(r is not None for r in records.values()):
            status, error = "done", None
        elif run_rec.get("status") == "failed":
            status, error = "failed", run_rec.get("error")
        else:
            status, error = "pending", None
        metrics: dict[str, Any] = {}
        meas = records.get("measure")
        if meas is not None:
            metrics.update(meas["result"].get("summary", {}))
        ev = records.get("evaluate")
        if ev is not None:
            m = ev["result"]["metrics"]
            metrics.update({"gFID": m.get("fid"), "IS": m.get("inception_score"), "precision": m.get("precision"),
                            "recall": m.get("recall")})
        tok = records.get("tokenizer")
        runs.append({
            "run_id": run.run_id, "label": run.variant.label, "slug": run.variant.slug, "seed": run.seed,
            "tokenizer": run.variant.tokenizer, "set": list(run.variant.set), "panels": list(run.variant.panels),
            "x": run.variant.x, "status": status, "error": error,
            "latent_shape": tok["result"].get("latent_shape") if tok else None,
            "stage_seconds": {s: r["seconds"] for s, r in records.items() if r is not None},
            "stage_keys": {s: ctx.key(s) for s in study.stages},
            "metrics": {k: metrics.get(k) for k in METRIC_COLUMNS},
        })
    return {"study": to_dict(study), "budget": budget, "budget_note": study.budget(budget).note,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commands": commands or {}, "runs": runs}


def _override_columns(runs: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for text in r["set"]:
            key = ".".join(parse_override(text)[0])
            if key not in keys:
                keys.append(key)
    return keys


def results_csv(results: dict[str, Any]) -> str:
    """The tidy table: one row per run (variant x seed)."""
    runs = results["runs"]
    stages = results["study"]["stages"]
    over = _override_columns(runs)
    header = ["run_id", "label", "seed", "tokenizer", "panels", "x", "status", "error", "latent_shape",
              *METRIC_COLUMNS, *over, *[f"{s}_s" for s in stages]]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in runs:
        values = {".".join(parse_override(t)[0]): parse_override(t)[1] for t in r["set"]}
        writer.writerow([r["run_id"], r["label"], r["seed"], r["tokenizer"], ";".join(r["panels"]),
                         "" if r["x"] is None else r["x"], r["status"], r["error"] or "",
                         "x".join(map(str, r["latent_shape"])) if r["latent_shape"] else "",
                         *["" if r["metrics"].get(m) is None else r["metrics"][m] for m in METRIC_COLUMNS],
                         *[values.get(k, "") for k in over],
                         *[r["stage_seconds"].get(s, "") for s in stages]])
    return buf.getvalue()


def write_study_results(results: dict[str, Any], work: str | Path, out_dir: str | Path) -> Path:
    """Write results.json, results.csv, each stage's JSON (``stages/<run>/<stage>.json``) and the report."""
    from manifold_lab.reports.study_report import write_study_report

    work, out = Path(work), Path(out_dir)
    for r in results["runs"]:
        for stage, key in r["stage_keys"].items():
            rec = read_stage_record(work / "stages" / stage / key)
            if rec is not None:
                write_json(out / "stages" / r["run_id"] / f"{stage}.json", rec)
        measure = work / "stages" / "measure" / r["stage_keys"].get("measure", "-") / "measure" / "metrics.json"
        if measure.is_file():
            write_text(out / "stages" / r["run_id"] / "measure_metrics.json", measure.read_text())
    write_json(out / "results.json", results)
    write_text(out / "results.csv", results_csv(results))
    write_study_report(results, out)
    return out




def validate_study(study: StudyConfig, budget: str, work: str | Path = ".") -> None:
    """Fail before anything runs when a tokenizer, an override or a recipe key does not exist."""
    from manifold_lab.errors import ConfigError, ManifoldLabError
    from manifold_lab.tokenizers import get_spec
    from manifold_lab.tokenizers.training import load_recipe

    study.budget(budget)
    for run in study.runs():
        ctx = RunContext(study=study, budget_name=budget, run=run, work=Path(work))
        try:
            spec = get_spec(run.variant.tokenizer)
            if spec.default_recipe is not None and not (spec.pretrained is not None and not run.variant.set):
                load_recipe(run.variant.tokenizer, spec.default_recipe, ctx.tokenizer_overrides())
            for stage in study.stages:
                ctx.key(stage)
        except ManifoldLabError as exc:
            raise ConfigError(f"variant {run.variant.label!r} (budget {budget}): {exc}") from exc


__all__ = ["METRIC_COLUMNS", "collect_results", "execute_run", "results_csv", "run_record_path",
           "validate_study", "write_study_results"]
