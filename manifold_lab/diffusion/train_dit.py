"""Train a LightningDiT on a latent cache with the shared engine (``manifold-lab train-dit``).

The loss is flow matching on the package's one time convention (``manifold_lab.diffusion``): a
latent ``x_0``, noise ``eps``, a time ``t`` from the transport's distribution (logit-normal, time
shift), the velocity target ``eps - x_0``; class labels are replaced by the null label with
probability ``model.class_dropout_prob`` so the model also learns the unconditional velocity CFG needs.

Per-sample randomness: the noise, the time and the label drop of every sample come from a generator
seeded by ``(train.seed, step, item index)``. A step's loss therefore depends only on which items
are in the global batch, not on how they are split over processes or micro-batches: DDP over two
processes gives the same update as one process with the combined batch, and a resumed run
continues exactly. (The model's own train-mode label dropout is switched off; the loss owns it.)

The finished model is written as a folder ``dit/`` (``model.safetensors`` = EMA weights,
``config.json`` = model and transport config, latent shape, classes, the tokenizer's fingerprint
and the latent normalisation statistics), which ``sample`` loads with :func:`load_dit`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from manifold_lab import distributed
from manifold_lab.config import from_dict, to_dict
from manifold_lab.diffusion.config import GFIDRecipe
from manifold_lab.diffusion.latent_cache import LatentCache, LatentDataset
from manifold_lab.diffusion.model import DiTConfig, LightningDiT
from manifold_lab.diffusion.transport import TransportConfig, resolve_shift, sample_t, velocity_loss
from manifold_lab.errors import CheckpointError
from manifold_lab.io import atomic_dir, load_tensors, save_tensors, write_json
from manifold_lab.train import Trainer
from manifold_lab.train.engine import unwrap_model

if TYPE_CHECKING:  # used in annotations only; the module does not need the tokenizers package at import
    from manifold_lab.tokenizers.base import LatentStats

DIT_FORMAT = "manifold-lab-dit"
DIT_FORMAT_VERSION = 1
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for one (run seed, step, item) triple (splitmix-style mixing, no collisions in practice)."""
    x = (seed * _MIX[0] + step * _MIX[1] + index * _MIX[2] + 1) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * _MIX[1]) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & ((1 << 63) - 1)


class FlowMatchingObjective:
    """``loss_fn(model, batch, step)`` for the engine: batch ``(z, y, index)`` of normalised latents."""

    def __init__(self, transport: TransportConfig, latent_shape: tuple[int, int, int], num_classes: int,
                 class_dropout_prob: float, seed: int) -> None:
        self.transport = transport
        self.latent_shape = tuple(latent_shape)
        self.num_classes = int(num_classes)
        self.class_dropout_prob = float(class_dropout_prob)
        self.seed = int(seed)

    def draws(self, index: torch.Tensor, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
        """(eps [B,C,h,w], t [B], drop [B] bool) for the items ``index`` at ``step``; same on any process."""
        eps, ts, drops = [], [], []
        for i in index.tolist():
            g = torch.Generator().manual_seed(sample_seed(self.seed, step, int(i)))
            ts.append(sample_t(1, self.transport, self.latent_shape, generator=g))
            eps.append(torch.randn(self.latent_shape, generator=g))
            drops.append(torch.rand((), generator=g) < self.class_dropout_prob)
        return (torch.stack(eps).to(device), torch.cat(ts).to(device).float(),
                torch.stack(drops).to(device))

    def __call__(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, y, index = batch
        x0 = x0.float()
        eps, t, drop = self.draws(index, step, x0.device)
        y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return velocity_loss(model, x0, eps, t, y, self.transport.cos_loss_weight)


def build_dit(cfg: DiTConfig, latent_shape: tuple[int, int, int], num_classes: int) -> LightningDiT:
    """A LightningDiT for latents of ``latent_shape`` = (C, h, w) and ``num_classes`` classes."""
    c, h, w = latent_shape
    return LightningDiT(cfg, in_channels=int(c), input_size=(int(h), int(w)), num_classes=int(num_classes))


def _sample_grid(tokenizer: Any, stats: LatentStats, recipe: GFIDRecipe, latent_shape, num_classes: int):
    """An image_fn: one Euler-sampled image per class (fixed noise), decoded, for TensorBoard."""
    from manifold_lab.diffusion.samplers import SamplerConfig, sample

    per_class = min(num_classes, 10)
    y = torch.arange(per_class)
    noise = torch.randn((per_class, *latent_shape), generator=torch.Generator().manual_seed(1234))
    cfg = SamplerConfig(method="euler", steps=min(recipe.sample.steps, 16), cfg_scale=recipe.sample.cfg_scale,
                        cfg_interval=recipe.sample.cfg_interval, shift=recipe.sample.shift)

    def image_fn(model: nn.Module, step: int) -> torch.Tensor | None:
        if tokenizer is None:
            return None
        device = next(model.parameters()).device
        z = sample(model, noise.to(device), y.to(device), cfg, num_classes=num_classes, latent_shape=latent_shape)
        tok_device = next(tokenizer.parameters()).device
        return tokenizer.decode(stats.denormalize(z.float()).to(tok_device)).clamp(-1, 1)

    return image_fn


def train_dit(recipe: GFIDRecipe, cache_dir: str | Path, run_dir: str | Path, save_dir: str | Path | None = None,
              tokenizer: Any = None, progress: bool = True) -> tuple[LightningDiT, Path]:
    """Train on the cache in ``cache_dir``; resumes from ``run_dir``; returns (EMA model, saved dit folder).

    ``tokenizer`` (optional) decodes a sample grid at every checkpoint for TensorBoard.
    """
    cache = LatentCache(cache_dir)
    dataset = LatentDataset(cache, flip=recipe.data.flip)
    latent_shape = cache.latent_shape
    num_classes = dataset.num_classes
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
        torch.manual_seed(recipe.train.seed)
        model = build_dit(recipe.model, latent_shape, num_classes)
    model.y_embedder.dropout_prob = 0.0  # the objective drops labels with per-sample seeds (module docstring)
    objective = FlowMatchingObjective(recipe.transport, latent_shape, num_classes,
                                      recipe.model.class_dropout_prob, recipe.train.seed)
    run_dir = Path(run_dir)
    save_dir = Path(save_dir) if save_dir is not None else run_dir / "dit"
    run_config = {"model": to_dict(recipe.model), "transport": to_dict(recipe.transport),
                  "data": {"cache": cache.meta.get("tokenizer_fingerprint"), "dataset": cache.meta.get("dataset"),
                           "num_items": cache.num_items, "flip": recipe.data.flip},
                  "latent_shape": list(latent_shape), "num_classes": num_classes}
    image_fn = _sample_grid(tokenizer, cache.stats, recipe, latent_shape, num_classes) if tokenizer else None
    trainer = Trainer(model, objective, dataset, recipe.train, run_dir, progress=progress, image_fn=image_fn,
                      run_config=run_config)
    ema = trainer.fit()
    ema.eval()
    if distributed.is_main_process():
        meta = {
            "format": DIT_FORMAT, "format_version": DIT_FORMAT_VERSION,
            "model": to_dict(recipe.model), "transport": to_dict(recipe.transport),
            "latent_shape": list(latent_shape), "num_classes": num_classes,
            "tokenizer": cache.meta.get("tokenizer"), "tokenizer_fingerprint": cache.meta.get("tokenizer_fingerprint"),
            "latent_stats": cache.stats.to_json(), "steps": recipe.train.steps, "cache": str(cache.folder),
            "params": sum(p.numel() for p in ema.parameters()),
            "resolved_shift": resolve_shift(recipe.transport.shift, latent_shape, recipe.transport.shift_base),
        }
        with atomic_dir(save_dir) as tmp:
            save_tensors(tmp / "model.safetensors", unwrap_model(ema).state_dict(), metadata={"format": DIT_FORMAT})
            write_json(tmp / "config.json", meta)
    distributed.barrier()
    return ema, save_dir


def load_dit(folder: str | Path, device: str | torch.device = "cpu") -> tuple[LightningDiT, dict[str, Any]]:
    """A saved DiT (eval mode) and its ``config.json``; one-line errors for a missing or mismatched folder."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no trained DiT in {folder} (config.json missing); train one with "
                              "`manifold-lab train-dit`")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc.msg}); retrain or restore the DiT") from exc
    if meta.get("format") != DIT_FORMAT:
        raise CheckpointError(f"{folder} is not a manifold-lab DiT folder (format {meta.get('format')!r})")
    cfg = from_dict(DiTConfig, meta["model"], where="model")
    model = build_dit(cfg, tuple(meta["latent_shape"]), int(meta["num_classes"]))
    state = load_tensors(folder / "model.safetensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or bad:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                else f"shape mismatch at {bad[:3]}")
        raise CheckpointError(f"DiT weights in {folder} do not match its config.json ({what}); the folder is corrupt "
                              "or was edited, retrain it")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


__all__ = ["FlowMatchingObjective", "build_dit", "load_dit", "sample_seed", "train_dit"]
