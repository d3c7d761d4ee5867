"""Tokenizer commands: list the registry, train one from a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from manifold_lab.cli import app


@app.command("tokenizers")
def list_tokenizers() -> None:
    """List registered tokenizers (built-in and from installed packages' entry points)."""
    from manifold_lab.tokenizers import get_spec, list_tokenizers

    table = Table(title="registered tokenizers")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name in list_tokenizers():
        table.add_row(name, get_spec(name).description)
    Console().print(table)


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    tokenizer: str = typer.Option(..., "--tokenizer", "-t", help="Registered tokenizer name."),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML (default: the embedded CPU recipe)."),
    paper: bool = typer.Option(False, "--paper", help="Use the tokenizer's paper-scale recipe (ImageNet 256, GPUs)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: key=value (e.g. train.steps=200)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (checkpoints, logs); default "
                                           "runs/tokenizers/NAME. Rerun the same command to resume."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to save the trained tokenizer "
                                       "(default: RUN_DIR/tokenizer)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a tokenizer from a recipe; a killed run resumes when the same command is run again.

    Under ``torchrun`` (``torchrun --nproc_per_node N -m manifold_lab.cli train-tokenizer ...``) every
    process trains with DDP; rank 0 writes the run dir and the tokenizer.
    """
    from manifold_lab import distributed
    from manifold_lab.errors import ConfigError
    from manifold_lab.tokenizers import get_spec
    from manifold_lab.tokenizers.training import train_tokenizer

    if paper:
        if config is not None:
            raise ConfigError("pass either --paper or --config, not both")
        config = get_spec(tokenizer).paper_recipe
        if config is None:
            raise ConfigError(f"tokenizer '{tokenizer}' has no paper-scale recipe; pass one with --config")
    where = Path(run_dir) if run_dir is not None else Path("runs") / "tokenizers" / tokenizer
    saved = Path(out) if out is not None else where / "tokenizer"
    tok = train_tokenizer(tokenizer, config_path=config, overrides=list(set_), run_dir=where, save_dir=saved,
                          progress=progress)
    if distributed.is_main_process():
        typer.echo(f"trained {tok.name}: latent shape {tuple(tok.latent_shape)}; tokenizer saved in {saved} "
                   f"(measure it with: manifold-lab measure --checkpoint {saved})")


@app.command("convert-tokenizer")
def convert_tokenizer_cmd(
    converter: str = typer.Argument(..., help="Converter: vavae, vae-ldm, rae or pae."),
    src: Path = typer.Argument(..., help="The released checkpoint file (.pt/.pth/.safetensors)."),
    dst: Path = typer.Argument(..., help="Output tokenizer folder (model.safetensors + config.json)."),
    option: list[str] = typer.Option([], "--option", help="Converter option key=value (e.g. stats=stat.pt, "
                                     "encoder_weights=dinov2.pth, image_size=256); YAML-typed values."),
) -> None:
    """Convert an official released checkpoint into a manifold-lab tokenizer folder (then `measure --checkpoint`)."""
    import yaml

    from manifold_lab.errors import ConfigError
    from manifold_lab.tokenizers.convert import convert_checkpoint

    options = {}
    for text in option:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option must be key=value, got {text!r}")
        options[key.strip()] = yaml.safe_load(value)
    if not src.is_file():
        raise ConfigError(f"released checkpoint not found: {src}")
    tok = convert_checkpoint(converter, src, dst, **options)
    typer.echo(f"converted {src} with '{converter}': {tok.name}, latent shape {tuple(tok.latent_shape)}; saved in {dst} "
               f"(measure it with: manifold-lab measure --checkpoint {dst})")
