"""``manifold-lab compare``: profile tokenizers (or variants of one) side by side; the zoo table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from manifold_lab.cli import app


@app.command()
def compare(
    file: Path = typer.Argument(..., help="Comparison YAML: title, caption, baseline, measure overrides, variants."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default: the file's folder)."),
    only: list[str] = typer.Option([], "--only", help="Run only these variant labels (repeatable)."),
    report_only: bool = typer.Option(False, "--report-only", help="Redraw the report from stored results."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train (once, cached) and measure every variant, then write report.md, results.csv and profile.png."""
    from manifold_lab.measure.compare import load_comparison, load_records, run_comparison
    from manifold_lab.reports.compare_report import write_comparison_report

    cfg = load_comparison(file)
    out_dir = out or file.parent
    if not report_only:
        run_comparison(cfg, out_dir, progress=progress, only=only or None)
        if only:
            typer.echo(f"measured {', '.join(only)}; the report needs every variant (run without --only)")
            return
    records = load_records(cfg, out_dir)
    command = f"manifold-lab compare {file}" + (f" --out {out}" if out else "")
    write_comparison_report(cfg, records, out_dir, command)
    typer.echo(f"report written to {out_dir}/report.md (results.csv, profile.png)")
