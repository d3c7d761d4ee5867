"""``manifold-lab study run|status FILE`` and ``manifold-lab report STUDY``.

``study run`` validates the whole study first (tokenizers, every override, every recipe key), then
runs the missing stages of every (variant, seed) run with the chosen executor, then writes the
results and the report. It resumes: rerun the same command after a kill and only unfinished stages
run. ``report`` redraws every figure and table from a stored ``results.json`` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from manifold_lab.cli import app

study_app = typer.Typer(help="Controlled studies: variants x seeds through train -> measure -> gFID.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")

WORK_HELP = "Stage outputs (checkpoints, latents, samples), shared by studies (default: runs/studies)."


def default_report_dir(name: str, budget: str, default_budget: str) -> Path:
    """``reports/<study>`` for the study's default budget, ``reports/<study>-<budget>`` for the others."""
    return Path("reports") / (name if budget == default_budget else f"{name}-{budget}")


@study_app.command("run")
def study_run(
    file: Path = typer.Argument(..., help="Study YAML (studies/<name>.yaml) or a study name."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="Budget name (default: the study's)."),
    work: Path = typer.Option(Path("runs/studies"), "--work", help=WORK_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Report folder (default: reports/<study>[-<budget>])."),
    only: list[str] = typer.Option([], "--only", help="Run only these variants (label or slug; repeatable)."),
    overrides: list[str] = typer.Option([], "--set", help="Study override, e.g. executor.workers=2 (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Run every missing stage of every run, then write results.csv/json and the report."""
    from manifold_lab.studies.config import find_study, load_study
    from manifold_lab.studies.executors import run_all
    from manifold_lab.studies.runner import collect_results, validate_study, write_study_results

    path = find_study(str(file))
    study = load_study(path, overrides)
    budget = budget or study.default_budget
    validate_study(study, budget, work)
    console = Console(stderr=True)
    runs = study.runs(only or None)
    console.print(f"[bold]{study.name}[/] ({budget}): {len(runs)} run(s), stages {' -> '.join(study.stages)}, "
                  f"executor {study.executor.kind}, work folder {work}")
    records = run_all(study, budget, work, runs, study.executor, progress=progress,
                      notify=lambda msg: console.print(msg, highlight=False))
    out_dir = out or default_report_dir(study.name, budget, study.default_budget)
    commands = {"run": _command("study run", path, budget, study.default_budget, work, out),
                "report": f"manifold-lab report {out_dir}"}
    results = collect_results(study, budget, work, commands)
    write_study_results(results, work, out_dir)
    failed = [r for r in records if r["status"] == "failed"]
    pending = [r for r in results["runs"] if r["status"] == "pending"]
    console.print(f"report written to {out_dir}/report.md ({len(records) - len(failed)} run(s) done, "
                  f"{len(failed)} failed, {len(pending)} not run yet)")
    if failed:
        for r in failed:
            console.print(f"[red]failed[/] {r['run_id']}: {r['error']}", highlight=False)
        raise typer.Exit(1)


@study_app.command("status")
def study_status(
    file: Path = typer.Argument(..., help="Study YAML or name."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b"),
    work: Path = typer.Option(Path("runs/studies"), "--work", help=WORK_HELP),
) -> None:
    """Which stages of which runs are done, failed or missing (reads stored records only)."""
    from rich.table import Table

    from manifold_lab.studies.config import find_study, load_study
    from manifold_lab.studies.runner import collect_results

    study = load_study(find_study(str(file)))
    budget = budget or study.default_budget
    results = collect_results(study, budget, work)
    table = Table(title=f"{study.name} ({budget}) in {work}")
    table.add_column("run")
    for s in study.stages:
        table.add_column(s)
    table.add_column("status")
    table.add_column("gFID", justify="right")
    for r in results["runs"]:
        gfid = r["metrics"].get("gFID")
        table.add_row(r["run_id"], *[f"{r['stage_seconds'][s]:.0f} s" if s in r["stage_seconds"] else "·"
                                     for s in study.stages],
                      r["status"] + (f": {r['error']}" if r["error"] else ""),
                      "" if gfid is None else f"{gfid:.1f}")
    Console().print(table)
    done = sum(r["status"] == "done" for r in results["runs"])
    Console().print(f"{done}/{len(results['runs'])} runs done")


@app.command()
def report(
    study: str = typer.Argument(..., help="A study name (reports/<name>), a report folder, or a study YAML."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="With a study YAML or name: its budget."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report here (default: in place)."),
) -> None:
    """Redraw a study's figures, tables and report.md from its stored results.json (nothing is recomputed)."""
    import json

    from manifold_lab.errors import ManifoldLabError
    from manifold_lab.reports.study_report import write_study_report
    from manifold_lab.studies.config import find_study, load_study

    folder = Path(study)
    if not (folder / "results.json").is_file():
        if folder.suffix in (".yaml", ".yml") or Path("studies", f"{study}.yaml").is_file():
            cfg = load_study(find_study(study))
            folder = default_report_dir(cfg.name, budget or cfg.default_budget, cfg.default_budget)
        else:
            folder = Path("reports") / study
    results_file = folder / "results.json"
    if not results_file.is_file():
        raise ManifoldLabError(f"no stored results at {results_file}; run `manifold-lab study run` first")
    try:
        results = json.loads(results_file.read_text())
    except json.JSONDecodeError as exc:
        raise ManifoldLabError(f"{results_file} is not valid JSON ({exc.msg}); rerun the study to rewrite it") from exc
    target = out or folder
    write_study_report(results, target)
    typer.echo(f"report written to {target}/report.md")


def _command(cmd: str, path: Path, budget: str, default_budget: str, work: Path, out: Optional[Path]) -> str:
    parts = [f"manifold-lab {cmd} {path}"]
    if budget != default_budget:
        parts.append(f"--budget {budget}")
    if str(work) != "runs/studies":
        parts.append(f"--work {work}")
    if out is not None:
        parts.append(f"--out {out}")
    return " ".join(parts)
