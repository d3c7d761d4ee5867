"""``manifold-lab measure``: profile a tokenizer (by name or checkpoint) or a latents file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from manifold_lab.cli import app
from manifold_lab.config import load_config
from manifold_lab.distributed import init_from_env, is_main_process
from manifold_lab.errors import ManifoldLabError

DEFAULT_TOKENIZER = "pae"  # the headline tokenizer of the PAE paper


@app.command()
def measure(
    tokenizer: str = typer.Option(DEFAULT_TOKENIZER, "--tokenizer", "-t",
                                  help="Registered tokenizer name; its default checkpoint is trained on first use."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c",
                                              help="A saved tokenizer folder (model.safetensors + config.json)."),
    latents: Optional[Path] = typer.Option(None, "--latents",
                                           help="A safetensors file with 'latents' (N,C,h,w) and optional 'labels', "
                                                "'segments': encode-only profile."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with measure settings."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting: key=value (e.g. lpc.num_images=64)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset name or image folder (ImageNet layout)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder of instance/panoptic mask PNGs for SSC."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results folder (default results/measure-<name>)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Measure SSC, LPC, GSQ, eRank, reconstruction and probes; write metrics.json + report.md + figures."""
    from manifold_lab.measure.config import MeasureConfig
    from manifold_lab.measure.pipeline import measure_latents, measure_tokenizer, run_metadata
    from manifold_lab.measure.progress import StageTracker
    from manifold_lab.reports.measure_report import print_summary, write_results

    overrides = list(set_)
    for key, value in (("dataset", data), ("masks", masks), ("seed", seed), ("device", device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(MeasureConfig, config, overrides)
    if checkpoint is not None and latents is not None:
        raise ManifoldLabError("pass either --checkpoint or --latents, not both")

    init_from_env()
    started = time.perf_counter()
    with StageTracker(enabled=progress and is_main_process()) as tracker:
        if latents is not None:
            subject = {"name": latents.stem, "latents_file": str(latents)}
            result = measure_latents(latents, cfg, tracker)
        else:
            tok, subject = _load_tokenizer(tokenizer, checkpoint, progress, tracker)
            result = measure_tokenizer(tok, cfg, tracker)
    meta = run_metadata(cfg, subject, tracker.timings, started)
    if not is_main_process():
        return
    out_dir = out or Path("results") / f"measure-{subject['name']}"
    write_results(result, meta, out_dir)
    print_summary(result.metrics, title=f"manifold-lab measure: {subject['name']}")
    typer.echo(f"results written to {out_dir}/ (metrics.json, report.md, figures/) in {meta['wall_time_s']:.0f} s")


def _load_tokenizer(name: str, checkpoint: Optional[Path], progress: bool, tracker):
    from manifold_lab.tokenizers import get_pretrained, load_tokenizer

    if checkpoint is not None:
        with tracker.stage("load checkpoint"):
            tok = load_tokenizer(checkpoint)
        return tok, {"name": tok.name, "checkpoint": str(checkpoint)}
    with tracker.stage(f"default checkpoint: {name}"):
        tok = get_pretrained(name, progress=progress)
    return tok, {"name": name, "checkpoint": f"default ({name}, embedded recipe)"}
