"""Default checkpoints: a ready tokenizer for the embedded data, trained once on this machine and cached.

Nothing can be downloaded here, so "pretrained" means: a package that brings its own weights
provides ``TokenizerSpec.pretrained``; for the others the spec's ``default_recipe`` (a small CPU
recipe) is trained the first time the checkpoint is asked for, then reused. The cache folder is
keyed by a hash of the recipe's bytes and the manifold-lab version, so editing the recipe or
upgrading the package trains a fresh checkpoint instead of silently reusing a stale one::

    <cache>/checkpoints/<name>-<key>/   the tokenizer folder (Tokenizer.save format), atomic
    <cache>/runs/<name>-<key>/          the engine's run dir (checkpoints, logs): a killed training
                                        run resumes from here on the next call
    <cache> = $MANIFOLD_LAB_CACHE or ~/.cache/manifold-lab

Run ``python -m manifold_lab.tokenizers vae`` to train (or locate) a default checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from manifold_lab.errors import ManifoldLabError, MissingWeightsError
from manifold_lab.io import exclusive_lock
from manifold_lab.tokenizers.base import CONFIG_FILE, load_tokenizer
from manifold_lab.tokenizers.registry import get_spec
from manifold_lab.tokenizers.training import train_tokenizer

CACHE_ENV = "MANIFOLD_LAB_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MANIFOLD_LAB_CACHE``, else ``~/.cache/manifold-lab``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/manifold-lab").expanduser()


def recipe_key(name: str, recipe: str | os.PathLike, overrides: Sequence[str] = ()) -> str:
    """12 hex digits of sha256(tokenizer name, recipe bytes, manifold-lab version[, overrides])."""
    from manifold_lab import __version__

    path = Path(recipe)
    if not path.is_file():
        raise ManifoldLabError(f"recipe file not found: {path}; reinstall manifold-lab or pass an existing recipe")
    digest = hashlib.sha256()
    parts = [name.encode(), path.read_bytes(), __version__.encode()]
    if overrides:  # no overrides keeps the keys of existing default checkpoints
        parts.append("\n".join(overrides).encode())
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:12]


def _recipe_for(name: str, recipe: str | os.PathLike | None) -> Path:
    spec = get_spec(name)
    path = recipe if recipe is not None else spec.default_recipe
    if path is None:
        raise ManifoldLabError(
            f"tokenizer '{name}' has neither pretrained weights nor a default recipe; train it with "
            "train_tokenizer(name, config_path=<recipe.yaml>)"
        )
    return Path(path)


def pretrained_dir(name: str, cache_dir: str | os.PathLike | None = None,
                   recipe: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Path:
    """Where the default checkpoint of ``name`` (recipe + ``overrides``) lives, whether or not it exists yet."""
    path = _recipe_for(name, recipe)
    return cache_root(cache_dir) / "checkpoints" / f"{name}-{recipe_key(name, path, overrides)}"


def train_command(name: str, recipe: str | os.PathLike | None = None) -> str:
    """The shell command that trains the default checkpoint (quoted in error messages)."""
    extra = f" --recipe {recipe}" if recipe is not None else ""
    return f"python -m manifold_lab.tokenizers {name}{extra}"


def get_pretrained(name: str, cache_dir: str | os.PathLike | None = None, train_if_missing: bool = True,
                   progress: bool = True, recipe: str | os.PathLike | None = None,
                   overrides: Sequence[str] = ()) -> Any:
    """The default tokenizer ``name`` for the embedded data (eval mode, latent stats included).

    A spec with ``pretrained`` returns its own ready tokenizer. Otherwise the cached checkpoint for
    the default recipe (or ``recipe``) is loaded, after training it once if it is missing; with
    ``train_if_missing=False`` a missing checkpoint raises :class:`MissingWeightsError` naming the
    command that trains it.
    """
    spec = get_spec(name)
    if spec.pretrained is not None and recipe is None and not overrides:
        return spec.pretrained()
    recipe_path = _recipe_for(name, recipe)
    folder = pretrained_dir(name, cache_dir, recipe_path, overrides)
    if (folder / CONFIG_FILE).is_file():
        return load_tokenizer(folder)
    if not train_if_missing:
        how = train_command(name, recipe) if not overrides else f"get_pretrained('{name}', overrides={list(overrides)})"
        raise MissingWeightsError(
            f"no default '{name}' checkpoint in {folder}; train it once with `{how}`"
            f"{' (with MANIFOLD_LAB_CACHE=' + str(cache_root(cache_dir)) + ')' if cache_dir is not None else ''}"
        )
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if not (folder / CONFIG_FILE).is_file():  # another process may have finished it meanwhile
            run_dir = cache_root(cache_dir) / "runs" / folder.name
            train_tokenizer(name, recipe_path, overrides, run_dir=run_dir, progress=progress, save_dir=folder)
    return load_tokenizer(folder)


def main(argv: list[str] | None = None) -> int:
    """``python -m manifold_lab.tokenizers NAME`` (see ``__main__.py``): train if needed, print the folder."""
    parser = argparse.ArgumentParser(prog="python -m manifold_lab.tokenizers",
                                     description="Train (once) and locate the default checkpoint of a tokenizer.")
    parser.add_argument("name", help="registered tokenizer name, e.g. vae")
    parser.add_argument("--cache-dir", default=None, help=f"cache root (default: ${CACHE_ENV} or ~/.cache/manifold-lab)")
    parser.add_argument("--recipe", default=None, help="recipe YAML (default: the tokenizer's CPU recipe)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        tok = get_pretrained(args.name, cache_dir=args.cache_dir, progress=not args.no_progress, recipe=args.recipe)
    except ManifoldLabError as exc:
        print(f"error: {exc}")
        return 2
    spec = get_spec(args.name)
    if spec.pretrained is not None and args.recipe is None:
        print(f"{args.name}: provided by its package (no local checkpoint)")
    else:
        print(pretrained_dir(args.name, args.cache_dir, args.recipe))
    print(f"latent_shape={tuple(tok.latent_shape)} stats: {tok.latent_stats.how}")
    return 0
