"""Training a registered tokenizer from a recipe: model + data + the shared engine + latent statistics.

A recipe is one YAML file with three sections (plus an optional ``tokenizer:`` name check)::

    model:  the tokenizer's config dataclass (e.g. VAEConfig fields)
    train:  manifold_lab.train.TrainConfig (steps, batch_size, optim: {lr, ...}, ...)
    data:   name (registered dataset or folder), split, image_size (default: model's), stats_images

After the engine has trained the model, the EMA weights are kept and per-channel latent statistics
are computed on ``stats_images`` training images, so the saved tokenizer carries its own
normalisation (see :class:`manifold_lab.tokenizers.base.LatentStats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from manifold_lab import distributed
from manifold_lab.config import apply_overrides, from_dict, read_yaml, to_dict
from manifold_lab.errors import ConfigError, ManifoldLabError
from manifold_lab.io import atomic_dir
from manifold_lab.tokenizers.base import LatentStats, TokenizerBase
from manifold_lab.tokenizers.registry import TokenizerSpec, get_spec
from manifold_lab.train import TrainConfig, Trainer


@dataclass
class DataSection:
    """Which images a tokenizer trains on and how many feed its latent statistics."""

    name: str = "fashion-mnist"  # a registered dataset name or an image folder
    split: str = "train"
    image_size: int | None = None  # None: the model config's image_size
    stats_images: int = 10_000  # images whose latents give the per-channel mean/std
    stats_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.stats_images < 1:
            raise ConfigError(f"data.stats_images must be >= 1, got {self.stats_images}")
        if self.stats_batch_size < 1:
            raise ConfigError(f"data.stats_batch_size must be >= 1, got {self.stats_batch_size}")


@dataclass
class TokenizerRecipe:
    """A validated recipe: ``model`` is an instance of the tokenizer's own config dataclass."""

    tokenizer: str
    model: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataSection = field(default_factory=DataSection)

    @classmethod
    def from_dict(cls, spec: TokenizerSpec, data: dict[str, Any], where: str = "recipe") -> "TokenizerRecipe":
        """Validate every section (unknown keys anywhere are rejected with the valid ones listed)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping with sections model, train, data")
        valid = ("data", "model", "tokenizer", "train")
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"{where}: unknown section{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                              f"valid sections: {', '.join(valid)}")
        named = data.get("tokenizer", spec.name)
        if named != spec.name:
            raise ConfigError(f"{where} is a recipe for tokenizer '{named}', not '{spec.name}'; pass the right recipe")
        model = from_dict(spec.config_cls, data.get("model") or {}, where="model")
        train = from_dict(TrainConfig, data.get("train") or {}, where="train")
        section = from_dict(DataSection, data.get("data") or {}, where="data")
        model_size = getattr(model, "image_size", None)
        if section.image_size is None:
            if model_size is None:
                raise ConfigError(f"{where}: set data.image_size (the '{spec.name}' config has no image_size)")
            section.image_size = int(model_size)
        elif model_size is not None and int(model_size) != section.image_size:
            raise ConfigError(f"{where}: data.image_size {section.image_size} differs from model.image_size "
                              f"{model_size}; make them equal")
        return cls(tokenizer=spec.name, model=model, train=train, data=section)

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "model": to_dict(self.model), "train": to_dict(self.train),
                "data": to_dict(self.data)}


def load_recipe(name: str, path: str | Path | None = None, overrides: Sequence[str] = ()) -> TokenizerRecipe:
    """The recipe at ``path`` (default: the spec's ``default_recipe``) with ``section.key=value`` overrides."""
    spec = get_spec(name)
    path = path if path is not None else spec.default_recipe
    if path is None:
        raise ConfigError(f"tokenizer '{name}' has no default recipe; pass a recipe YAML (model/train/data sections)")
    data = apply_overrides(read_yaml(path), list(overrides))
    return TokenizerRecipe.from_dict(spec, data, where=str(path))


def build_training_dataset(section: DataSection) -> Dataset:
    """The dataset a recipe's ``data`` section names (items: image [3,S,S] in [-1,1], label)."""
    from manifold_lab.data import build_dataset

    return build_dataset(section.name, split=section.split, image_size=int(section.image_size))


@torch.no_grad()
def compute_latent_stats(tokenizer: Any, dataset: Dataset, num_images: int, batch_size: int = 256,
                         seed: int = 0, description: str | None = None) -> LatentStats:
    """Per-channel mean/std of ``tokenizer.encode`` latents over ``num_images`` images of ``dataset``.

    The images are the first ``num_images`` of a permutation seeded by ``seed`` (all of them when the
    dataset is smaller); sums are accumulated in float64 so 10k latents lose no precision.
    """
    n = min(int(num_images), len(dataset))
    if n < 1:
        raise ManifoldLabError("latent statistics need at least one image; the dataset is empty")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False)
    param = next(iter(tokenizer.parameters()), None) if hasattr(tokenizer, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    was_training = getattr(tokenizer, "training", False)
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()

    def latents():
        for batch in loader:
            x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
            yield tokenizer.encode(x)

    try:
        moments = LatentStats.from_latents(latents(), how="")
    finally:
        if was_training:
            tokenizer.train()
    name = getattr(dataset, "name", type(dataset).__name__)
    split = getattr(dataset, "split", None)
    size = getattr(dataset, "image_size", None)
    what = description or (f"{n:,} {split + ' ' if split else ''}images of {name}"
                           f"{f' at {size}x{size}' if size else ''}")
    how = f"per-channel mean/std of encode() latents over {what} (seed {seed})"
    return LatentStats(moments.mean, moments.std, how)


def _reconstruction_grid(dataset: Dataset, count: int = 8):
    """An image_fn for the engine: a row of ``count`` fixed training images over a row of their reconstructions."""
    fixed = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])

    def image_fn(model: Any, step: int) -> torch.Tensor:
        device = next(model.parameters()).device
        x = fixed.to(device)
        recon = model.decode(model.encode(x)).clamp(-1, 1)
        return torch.cat([x, recon.to(x.dtype)]), len(x)

    return image_fn


def train_tokenizer(name: str, config_path: str | Path | None = None, overrides: Sequence[str] = (),
                    run_dir: str | Path | None = None, progress: bool = True,
                    save_dir: str | Path | None = None) -> TokenizerBase:
    """Train tokenizer ``name`` on its recipe and save it; returns the EMA model with latent stats.

    ``config_path``: the recipe (default: the spec's ``default_recipe``); ``overrides``:
    ``section.key=value`` strings (``train.steps=200``). The engine keeps its checkpoints in
    ``run_dir`` (default ``runs/tokenizers/<name>``) and resumes from them when restarted with the
    same recipe; the finished tokenizer is saved (atomically) to ``save_dir`` (default
    ``<run_dir>/tokenizer``) and can be reloaded with :func:`load_tokenizer`.
    """
    spec = get_spec(name)
    if spec.loss is None and spec.criterion is None:
        raise ManifoldLabError(
            f"tokenizer '{name}' has no training loss in manifold-lab; use get_pretrained('{name}') or its "
            "package's own training code"
        )
    recipe = load_recipe(name, config_path, overrides)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / "tokenizers" / name
    save_dir = Path(save_dir) if save_dir is not None else run_dir / "tokenizer"
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
        torch.manual_seed(recipe.train.seed)
        model = spec.build(recipe.model)
    if not isinstance(model, TokenizerBase):
        raise ManifoldLabError(f"tokenizer '{name}': build() must return a TokenizerBase to be trained and saved here")
    dataset = build_training_dataset(recipe.data)
    run_config = {k: v for k, v in recipe.to_dict().items() if k != "train"}
    if spec.prepare is not None:
        spec.prepare(model, recipe, dataset, run_dir, progress)
    loss_fn = spec.criterion(recipe.model) if spec.criterion is not None else spec.loss
    trainer = Trainer(model, loss_fn, dataset, recipe.train, run_dir, progress=progress,
                      image_fn=_reconstruction_grid(dataset), run_config=run_config)
    tokenizer = trainer.fit()
    tokenizer.eval()
    if not distributed.is_main_process():  # under torchrun only rank 0 computes statistics and saves
        distributed.barrier()
        return tokenizer
    stats = compute_latent_stats(tokenizer, dataset, recipe.data.stats_images,
                                 batch_size=recipe.data.stats_batch_size, seed=recipe.train.seed)
    tokenizer.set_latent_stats(stats)
    with atomic_dir(save_dir) as tmp:
        tokenizer.save(tmp)
    distributed.barrier()
    return tokenizer


__all__ = ["DataSection", "TokenizerRecipe", "load_recipe", "build_training_dataset", "compute_latent_stats",
           "train_tokenizer"]
