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
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: key=value (e.g. train.steps=200)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (checkpoints, logs, final tokenizer)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a tokenizer from a recipe; a killed run resumes when the same command is run again."""
    from manifold_lab.tokenizers.training import train_tokenizer

    tok = train_tokenizer(tokenizer, config_path=config, overrides=list(set_), run_dir=run_dir, progress=progress)
    where = run_dir or Path("runs") / "tokenizers" / tokenizer
    typer.echo(f"trained {tok.name}: latent shape {tuple(tok.latent_shape)}; tokenizer saved in {where}/tokenizer "
               f"(measure it with: manifold-lab measure --checkpoint {where}/tokenizer)")
