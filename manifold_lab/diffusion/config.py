"""The gFID recipe: one YAML with every setting of cache-latents, train-dit, sample and evaluate.

A recipe is a *budget* (how much data, how big a DiT, how long, how many samples), not a tokenizer:
the same file serves every tokenizer, so a comparison between tokenizers changes nothing else.
Built-in budgets live in ``manifold_lab/diffusion/recipes/`` (``cpu`` is the default, ``smoke`` is
for tests, ``imagenet256`` is the paper's setting); ``--config FILE`` takes your own and ``--set
section.key=value`` overrides any value. Unknown sections or keys are refused with the valid ones.

Sections::

    data:       the images to encode (a registered dataset or a folder) and the latent cache
    model:      DiTConfig          (manifold_lab.diffusion.model)
    transport:  TransportConfig    (manifold_lab.diffusion.transport)
    train:      TrainConfig        (manifold_lab.train, the shared engine)
    sample:     SamplerConfig + how many samples, batch, seed (manifold_lab.diffusion.samplers)
    eval:       EvalConfig + the reference set (manifold_lab.diffusion.evaluate)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from manifold_lab.config import apply_overrides, from_dict, read_yaml, to_dict
from manifold_lab.diffusion.evaluate import EvalConfig
from manifold_lab.diffusion.model import DiTConfig
from manifold_lab.diffusion.samplers import SamplerConfig
from manifold_lab.diffusion.transport import TransportConfig
from manifold_lab.errors import ConfigError
from manifold_lab.train import TrainConfig

BUDGETS = ("cpu", "smoke", "imagenet256")
DEFAULT_BUDGET = "cpu"


@dataclass
class LatentDataConfig:
    """Which images are encoded into the latent cache the DiT trains on."""

    name: str = "fashion-mnist"  # a registered dataset or an image folder (class sub-folders = labels)
    split: str = "train"
    image_size: int | None = None  # None: the tokenizer's image size
    num_items: int | None = None  # None: the whole split; else a seeded random subset of this many images
    flip: bool = True  # also cache horizontally flipped images (2x the training latents)
    batch_size: int = 256  # encode batch
    shard_size: int = 8192
    seed: int = 0
    stats_items: int = 10_000  # latents for the normalisation statistics when the tokenizer has none

    def __post_init__(self) -> None:
        if self.num_items is not None and self.num_items < 1:
            raise ConfigError(f"data.num_items must be >= 1 or null (all), got {self.num_items}")
        for key in ("batch_size", "shard_size", "stats_items"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class SampleSection(SamplerConfig):
    """The sampler plus how many samples to draw (class-balanced) and how."""

    num_samples: int = 2000
    batch_size: int = 250  # samples per chunk (one resumable file per chunk)
    seed: int = 0  # sample i's noise is seeded by (seed, i): independent of batch size and processes
    use_ema: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1:
            raise ConfigError(f"sample.num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"sample.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class EvalSection(EvalConfig):
    """The metric settings plus the reference the samples are compared with."""

    ref: str = "fashion-mnist"  # a dataset name or folder, an ADM reference .npz, or a saved stats file
    ref_split: str = "test"
    ref_max_items: int | None = None  # None: the whole reference set

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ref_max_items is not None and self.ref_max_items < 2:
            raise ConfigError(f"eval.ref_max_items must be >= 2 or null, got {self.ref_max_items}")


@dataclass
class GFIDRecipe:
    """Every setting of the gFID chain (see the module docstring)."""

    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    model: DiTConfig = field(default_factory=DiTConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleSection = field(default_factory=SampleSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def budget_path(budget: str) -> Path:
    """The built-in recipe file of a budget name."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'; valid budgets: {', '.join(BUDGETS)} (or pass --config FILE)")
    return Path(str(resources.files("manifold_lab.diffusion") / "recipes" / f"{budget}.yaml"))


def load_gfid_recipe(path: str | Path | None = None, overrides: Sequence[str] = (),
                     budget: str | None = None) -> GFIDRecipe:
    """The recipe at ``path`` (or the built-in ``budget``, default ``cpu``) with ``section.key=value`` overrides."""
    if path is not None and budget is not None:
        raise ConfigError("pass either a budget or a config file, not both")
    path = Path(path) if path is not None else budget_path(budget or DEFAULT_BUDGET)
    data = apply_overrides(read_yaml(path), list(overrides))
    return from_dict(GFIDRecipe, data, where=str(path))


__all__ = ["BUDGETS", "DEFAULT_BUDGET", "EvalSection", "GFIDRecipe", "LatentDataConfig", "SampleSection",
           "budget_path", "load_gfid_recipe"]
