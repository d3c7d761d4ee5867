"""Diffusion commands: cache-latents, train-dit, sample, evaluate and the gfid chain.

Every command takes the same recipe (``--budget`` name or ``--config`` file, plus ``--set``
overrides; see :mod:`manifold_lab.diffusion.config`), so a chain run by hand step by step and one
run by ``gfid`` use identical settings. All of them resume when rerun with the same arguments, and
all run under ``torchrun`` (``torchrun --nproc_per_node N -m manifold_lab.cli COMMAND ...``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from manifold_lab.cli import app

BUDGET_HELP = "Built-in recipe: cpu (default), smoke or imagenet256."


@contextmanager
def _bars(enabled: bool) -> Iterator[Callable[[str], Callable[[int, int], None] | None]]:
    """A factory of rich progress callbacks, one bar per named stage (rank 0 only).

    Each stage's bar is started on its first update and stopped when it completes, so stages that
    show their own live display (the training engine's bar) never overlap with it.
    """
    from manifold_lab import distributed

    enabled = enabled and distributed.is_main_process()
    live: list[Progress] = []

    def factory(name: str) -> Callable[[int, int], None] | None:
        if not enabled:
            return None
        state: dict[str, object] = {}

        def update(done: int, total: int) -> None:
            if "bar" not in state:
                bar = Progress(TextColumn("[bold]{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                               console=Console(stderr=True))
                bar.start()
                live.append(bar)
                state["bar"], state["task"] = bar, bar.add_task(name, total=total)
            bar = state["bar"]
            bar.update(state["task"], completed=done, total=total)
            if done >= total:
                bar.stop()

        return update

    try:
        yield factory
    finally:
        for bar in live:
            bar.stop()


def _recipe(budget: Optional[str], config: Optional[Path], set_: list[str]):
    from manifold_lab.diffusion.config import load_gfid_recipe

    return load_gfid_recipe(config, list(set_), budget=budget)


def _tokenizer(name: str, checkpoint: Optional[Path], device: str = "auto"):
    from manifold_lab.tokenizers import get_pretrained, load_tokenizer
    from manifold_lab.train.device import resolve_device

    tok = load_tokenizer(checkpoint) if checkpoint is not None else get_pretrained(name)
    return tok.to(resolve_device(device)).eval()


@app.command("cache-latents")
def cache_latents_cmd(
    tokenizer: str = typer.Option("pae", "--tokenizer", "-t", help="Registered tokenizer (default checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A saved tokenizer folder instead."),
    budget: Optional[str] = typer.Option(None, "--budget", help=BUDGET_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML (its data: section is used)."),
    set_: list[str] = typer.Option([], "--set", help="Override: data.num_items=5000, data.name=/path/to/folder ..."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache folder (default: shared, under the package cache)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Encode a dataset once into latent shards (+ flipped copies, labels); resumable and atomic."""
    from manifold_lab.diffusion.gfid import build_latent_cache
    from manifold_lab.diffusion.latent_cache import LatentCache

    recipe = _recipe(budget, config, set_)
    tok = _tokenizer(tokenizer, checkpoint, recipe.train.device)
    with _bars(progress) as bars:
        folder = build_latent_cache(tok, recipe, out, progress=bars("encode"))
    cache = LatentCache(folder)
    typer.echo(f"latent cache: {folder} ({cache.num_items:,} images{' + flips' if cache.has_flip else ''}, "
               f"latents {'x'.join(map(str, cache.latent_shape))}; normalisation: {cache.stats.how})")


@app.command("train-dit")
def train_dit_cmd(
    tokenizer: str = typer.Option("pae", "--tokenizer", "-t", help="Registered tokenizer (default checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A saved tokenizer folder instead."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Latent cache folder (default: made/reused for the "
                                         "tokenizer, as cache-latents does)."),
    budget: Optional[str] = typer.Option(None, "--budget", help=BUDGET_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override: train.steps=2000, model.size=S ..."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default runs/dit/TOKENIZER). "
                                           "Rerun the same command to resume."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a LightningDiT (flow matching, velocity, logit-normal t) on a tokenizer's latents."""
    from manifold_lab.diffusion.gfid import build_latent_cache
    from manifold_lab.diffusion.train_dit import train_dit

    recipe = _recipe(budget, config, set_)
    tok = _tokenizer(tokenizer, checkpoint, recipe.train.device)
    if cache is None:
        with _bars(progress) as bars:
            cache = build_latent_cache(tok, recipe, progress=bars("encode"))
    where = run_dir or Path("runs") / "dit" / tok.name
    _, saved = train_dit(recipe, cache, where, tokenizer=tok, progress=progress)
    typer.echo(f"DiT saved in {saved} (sample it with: manifold-lab sample {saved} --tokenizer {tokenizer}"
               f"{' --checkpoint ' + str(checkpoint) if checkpoint else ''})")


@app.command("sample")
def sample_cmd(
    dit: Path = typer.Argument(..., help="A trained DiT folder (train-dit's RUN_DIR/dit)."),
    tokenizer: str = typer.Option("pae", "--tokenizer", "-t", help="The tokenizer the DiT was trained with."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A saved tokenizer folder instead."),
    budget: Optional[str] = typer.Option(None, "--budget", help=BUDGET_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML (its sample: section is used)."),
    set_: list[str] = typer.Option([], "--set", help="Override: sample.num_samples=50000 sample.cfg_scale=1.5 ..."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default DIT/../samples)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Class-balanced samples -> ADM .npz (arr_0 uint8 NHWC, arr_1 labels) + PNG grid; resumable, torchrun-aware."""
    from manifold_lab.diffusion.sample_run import sample_dit
    from manifold_lab.diffusion.train_dit import load_dit
    from manifold_lab.train.device import resolve_device

    recipe = _recipe(budget, config, set_)
    device = resolve_device(recipe.train.device)
    model, meta = load_dit(dit, device=device)
    tok = _tokenizer(tokenizer, checkpoint, recipe.train.device)
    where = out or dit.parent / "samples"
    from manifold_lab.diffusion.gfid import class_names_of

    with _bars(progress) as bars:
        path = sample_dit(model, meta, tok, recipe.sample, where, dit_dir=dit, class_names=class_names_of(recipe),
                          progress=bars("sample"))
    typer.echo(f"samples written to {path} (grid: {where / 'grid.png'}); score them with: "
               f"manifold-lab evaluate {path}")


@app.command("evaluate")
def evaluate_cmd(
    samples: Path = typer.Argument(..., help="Samples .npz (ADM format: arr_0 uint8 NHWC)."),
    ref: str = typer.Option("fashion-mnist", "--ref", help="Reference: dataset name or folder, ADM reference .npz "
                            "(mu/sigma), or a stats file saved by evaluate."),
    split: str = typer.Option("test", "--split", help="Split of a dataset reference."),
    image_size: int = typer.Option(32, "--image-size", help="Image size of a dataset reference."),
    max_items: Optional[int] = typer.Option(None, "--max-items", help="Use at most this many reference images."),
    backbone: str = typer.Option("auto", "--backbone", help="auto (TF-FID Inception when its weights are present, "
                                 "else the embedded MobileNetV2), inception or mobilenet_v2."),
    set_: list[str] = typer.Option([], "--set", help="EvalConfig override: pr_k=3 batch_size=200 ..."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics JSON here (default: print only)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """FID, precision/recall (k=3) and Inception Score (when the backbone has a classifier head)."""
    from manifold_lab.config import apply_overrides, from_dict
    from manifold_lab.diffusion.evaluate import EvalConfig, evaluate_samples
    from manifold_lab.io import write_json

    cfg = from_dict(EvalConfig, apply_overrides({"backbone": backbone}, list(set_)), where="eval")
    with _bars(progress) as bars:
        metrics = evaluate_samples(str(samples), ref, cfg, split=split, max_items=max_items, image_size=image_size,
                                   progress=bars("features"))
    from manifold_lab import distributed

    if not distributed.is_main_process():  # the metrics are computed and reported on rank 0
        return
    if out is not None:
        write_json(out, metrics)
    typer.echo(json.dumps(metrics, indent=2, default=str))


@app.command("gfid")
def gfid_cmd(
    tokenizer: str = typer.Option("pae", "--tokenizer", "-t", help="Registered tokenizer (default checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A saved tokenizer folder instead."),
    budget: Optional[str] = typer.Option(None, "--budget", help=BUDGET_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML instead of a budget."),
    set_: list[str] = typer.Option([], "--set", help="Override any recipe value: section.key=value."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/gfid/TOKENIZER-BUDGET)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """cache-latents -> train-dit -> sample -> evaluate under one budget; rerun to resume."""
    from manifold_lab.diffusion.config import DEFAULT_BUDGET
    from manifold_lab.diffusion.gfid import run_gfid

    recipe = _recipe(budget, config, set_)
    label = f"budget {budget or DEFAULT_BUDGET}" if config is None else f"recipe {config}"
    label += f" + {' '.join(set_)}" if set_ else ""
    name = (checkpoint.name if checkpoint else tokenizer) + "-" + (budget or (config.stem if config else DEFAULT_BUDGET))
    where = out or Path("runs") / "gfid" / name
    with _bars(progress) as bars:
        record = run_gfid(tokenizer, recipe, where, checkpoint=checkpoint, budget_label=label, progress=bars,
                          train_progress=progress)
    if record:
        m = record["metrics"]
        typer.echo(f"gFID {m.get('fid'):.2f} ({m.get('backbone')}, {m.get('n_samples')} samples vs "
                   f"{m.get('n_reference')} reference); precision {m.get('precision'):.3f}, recall "
                   f"{m.get('recall'):.3f}; report: {where / 'report.md'}")
