"""Where a study's runs execute: this process, local worker processes, torchrun per stage, or SLURM.

No scheduler of our own: the unit of work is one run (variant x seed), its stages run in order, and
the stage outputs' locks and keys (:mod:`manifold_lab.studies.stages`) make any mix of executors
safe to resume and to run side by side.

* ``local``: ``workers: 1`` runs one run after another in this process (progress bars on);
  ``workers: N`` runs N runs at once in spawned processes, each with ``cores / N`` torch threads.
* ``torchrun``: each stage is launched as ``python -m torch.distributed.run --nproc_per_node N -m
  manifold_lab.studies.stage_main SPEC`` (DDP for training, sharded caching, sampling and
  evaluation); the stage's error, if any, comes back through ``error.txt`` in its folder.
* ``submitit``: one job per run through ``submitit.AutoExecutor`` (``cluster: slurm`` on a cluster,
  ``local`` to run the same jobs as local processes, ``debug`` in this process). A job with
  ``nproc_per_node > 1`` runs its stages with torchrun inside the allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from manifold_lab.config import from_dict, to_dict
from manifold_lab.errors import ManifoldLabError
from manifold_lab.io import write_json
from manifold_lab.studies.config import ExecutorConfig, RunSpec, StudyConfig
from manifold_lab.studies.runner import execute_run, run_record_path
from manifold_lab.studies.stages import RunContext

Notify = Callable[[str], None]


def run_all(study: StudyConfig, budget: str, work: str | Path, runs: Sequence[RunSpec], cfg: ExecutorConfig,
            *, progress: bool = True, notify: Notify | None = None) -> list[dict[str, Any]]:
    """Execute ``runs`` with the executor ``cfg``; returns one run record per run (done or failed)."""
    work = Path(work)
    if cfg.kind == "local" and cfg.workers == 1:
        return [execute_run(study, budget, work, r, progress=progress, notify=notify) for r in runs]
    if cfg.kind == "local":
        return _local_pool(study, budget, work, runs, cfg.workers, notify)
    if cfg.kind == "torchrun":
        stage_fn = torchrun_stage_fn(budget, cfg.nproc_per_node)
        return [execute_run(study, budget, work, r, notify=notify, stage_fn=stage_fn) for r in runs]
    return _submitit(study, budget, work, runs, cfg, notify)


# -- local worker processes ----------------------------------------------------------------------

def _worker(study_data: dict[str, Any], budget: str, work: str, run_id: str, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    study = from_dict(StudyConfig, study_data)
    return execute_run(study, budget, work, _find_run(study, run_id))


def _local_pool(study: StudyConfig, budget: str, work: Path, runs: Sequence[RunSpec], workers: int,
                notify: Notify | None) -> list[dict[str, Any]]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    data = to_dict(study)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_worker, data, budget, str(work), r.run_id, threads) for r in runs]
        records = []
        for fut in futures:
            rec = fut.result()
            if notify:
                notify(f"{rec['run_id']}: {rec['status']}" + (f" ({rec['error']})" if rec.get("error") else ""))
            records.append(rec)
    return records


def _find_run(study: StudyConfig, run_id: str) -> RunSpec:
    for r in study.runs():
        if r.run_id == run_id:
            return r
    raise ManifoldLabError(f"study {study.name} has no run {run_id!r}")


# -- torchrun, one launch per stage ---------------------------------------------------------------

ERROR_FILE = "error.txt"


def torchrun_command(spec_file: Path, nproc_per_node: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "manifold_lab.studies.stage_main", str(spec_file)]


def torchrun_stage_fn(budget: str, nproc_per_node: int) -> Callable[[RunContext, str], None]:
    """A ``stage_fn`` for :func:`execute_run` that runs each stage under torchrun."""

    def run(ctx: RunContext, stage: str) -> None:
        if ctx.record(stage) is not None:
            return
        folder = ctx.folder(stage)
        folder.mkdir(parents=True, exist_ok=True)
        spec = folder / "torchrun_spec.json"
        write_json(spec, {"study": to_dict(ctx.study), "budget": budget, "work": str(ctx.work),
                          "run_id": ctx.run.run_id, "stage": stage})
        (folder / ERROR_FILE).unlink(missing_ok=True)
        proc = subprocess.run(torchrun_command(spec, nproc_per_node), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            err = folder / ERROR_FILE
            why = err.read_text().strip() if err.is_file() else f"torchrun exited with code {proc.returncode}"
            raise ManifoldLabError(why)

    return run


# -- submitit (SLURM, or its local executor) ------------------------------------------------------

def _job(study_data: dict[str, Any], budget: str, work: str, run_id: str, nproc_per_node: int) -> dict[str, Any]:
    """What one submitit job runs (module-level so that it pickles)."""
    study = from_dict(StudyConfig, study_data)
    run = _find_run(study, run_id)
    stage_fn = torchrun_stage_fn(budget, nproc_per_node) if nproc_per_node > 1 else None
    return execute_run(study, budget, work, run, stage_fn=stage_fn)


def _submitit(study: StudyConfig, budget: str, work: Path, runs: Sequence[RunSpec], cfg: ExecutorConfig,
              notify: Notify | None) -> list[dict[str, Any]]:
    try:
        import submitit
    except ImportError as exc:
        raise ManifoldLabError("executor.kind=submitit needs the submitit package; pip install submitit") from exc
    folder = Path(cfg.folder) if cfg.folder else work / "submitit"
    ex = submitit.AutoExecutor(folder=folder, cluster=cfg.cluster)
    params: dict[str, Any] = {"timeout_min": cfg.timeout_min, "cpus_per_task": cfg.cpus_per_task,
                              "tasks_per_node": 1, "name": f"{study.name}-{budget}"}
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.cluster == "slurm":
        params["slurm_array_parallelism"] = cfg.max_parallel
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
    ex.update_parameters(**params)
    data = to_dict(study)
    n = len(runs)
    jobs = ex.map_array(_job, [data] * n, [budget] * n, [str(work)] * n, [r.run_id for r in runs],
                        [cfg.nproc_per_node] * n)
    records = []
    for run, job in zip(runs, jobs):
        try:
            rec = job.result()
        except Exception as exc:  # noqa: BLE001 -- the job died (timeout, node failure): record it, go on
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            rec = {"run_id": run.run_id, "label": run.variant.label, "seed": run.seed, "status": "failed",
                   "error": f"submitit job {job.job_id}: {first}"}
            write_json(run_record_path(work, study, budget, run), rec)
        if notify:
            notify(f"{rec['run_id']}: {rec['status']}" + (f" ({rec['error']})" if rec.get("error") else ""))
        records.append(rec)
    return records


def load_spec(path: str | Path) -> tuple[RunContext, str]:
    """A torchrun stage spec back into (context, stage)."""
    data = json.loads(Path(path).read_text())
    study = from_dict(StudyConfig, data["study"])
    return RunContext(study=study, budget_name=data["budget"], run=_find_run(study, data["run_id"]),
                      work=Path(data["work"])), data["stage"]


__all__ = ["ERROR_FILE", "load_spec", "run_all", "torchrun_command", "torchrun_stage_fn"]
