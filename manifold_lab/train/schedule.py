"""AdamW and the warm-up + cosine/constant learning-rate schedule.

The schedule is a pure function of the optimizer step (``LambdaLR`` multiplies the base lr by it), so
the lr after a resume is the one an uninterrupted run would have used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from manifold_lab.errors import ConfigError
from manifold_lab.train.config import OptimConfig


@dataclass
class WarmupDecay:
    """lr multiplier at 0-based optimizer step ``s``.

    Warm-up: ``(s + 1) / warmup_steps`` for ``s < warmup_steps`` (the first step already moves, the
    last warm-up step is at full lr). Then ``"constant"`` stays at 1 and ``"cosine"`` follows half a
    cosine from 1 at ``s = warmup_steps`` down to ``min_lr_ratio`` at the last step ``total_steps - 1``
    (and stays there if training goes on).
    """

    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Trainable parameters (of a module, or given) in two groups: matrices/kernels decay, 1-D tensors
    (norms, biases) do not."""
    decay, no_decay = [], []
    params = model.parameters() if isinstance(model, nn.Module) else model
    for param in params:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False); nothing to train")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module | Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, WarmupDecay(total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                                           schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio))
