"""Adversarial training parts shared by every tokenizer: the GAN settings, the PatchGAN discriminator,
its losses and the adaptive generator weight (after taming-transformers / LDM, written from the papers'
and the reference code's description, not copied).

* :class:`NLayerDiscriminator` -- the pix2pix/taming PatchGAN: a 4x4 stride-2 conv + LeakyReLU(0.2),
  ``disc_layers - 1`` further stride-2 convs (+ norm + LeakyReLU, widths doubling up to 8x), one
  stride-1 4x4 conv (+ norm + LeakyReLU) and a final 1-channel 4x4 conv: one real/fake logit per
  overlapping patch (a 70x70 receptive field with 3 layers). Convs are initialised N(0, 0.02), norm
  scales N(1, 0.02), as in pix2pix.
* Norm: **GroupNorm by default** (``disc_norm: group``), BatchNorm (``disc_norm: batch``, taming's
  choice) on request. GroupNorm normalises each image on its own, so a discriminator step is a sum of
  per-image terms: 2 DDP processes x B images give exactly the gradients of one process with 2B, and
  ``grad_accum`` micro-batches exactly those of one big batch -- the engine's tests pin both. BatchNorm
  makes every logit depend on the rest of its micro-batch (and taming feeds real and fake batches in
  separate calls, so each is normalised with its own statistics); under DDP it would need
  SyncBatchNorm, and micro-batching changes its statistics. The engine all-reduces the discriminator's
  gradients by hand (it is not wrapped in DDP), so with ``batch`` each process normalises over its own
  micro-batch -- what taming does under Lightning DDP without ``sync_batchnorm``.
* Losses: ``hinge`` -- D: ``0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))``, G:
  ``-mean D(x_rec)`` (taming/LDM); ``non-saturating`` -- D: ``0.5 (mean softplus(-D(x)) + mean
  softplus(D(x_rec)))``, G: ``mean softplus(-D(x_rec))``.
* :func:`adaptive_weight` -- ``||grad_W rec|| / (||grad_W g|| + 1e-4)`` at the decoder's last layer W,
  clamped to ``[0, max_adaptive_weight]`` and detached (taming's ``calculate_adaptive_weight``).
  Under DDP both gradients are averaged over processes first, so the weight is the one of the whole
  global batch (LDM computes it per GPU; averaging makes N processes equal one with the whole batch).
  It is a ratio of gradient norms, hence invariant to the scale of the reconstruction loss: our
  per-pixel mean L1 gives the same generator/reconstruction balance as LDM's per-image sum.

The engine trains a discriminator when the training criterion (an ``nn.Module``) has trainable
parameters and a ``discriminator_loss(step)`` method; see :class:`manifold_lab.tokenizers.losses.TokenizerCriterion`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab import distributed
from manifold_lab.errors import ConfigError

GAN_LOSSES = ("hinge", "non-saturating")
DISC_NORMS = ("group", "batch")


@dataclass
class GANConfig:
    """The optional GAN term of a tokenizer's reconstruction loss (``weight = 0`` switches it off).

    Generator term: ``weight * adaptive * g_loss`` from ``start_step`` on, where ``adaptive =
    ||grad_W rec|| / (||grad_W g_loss|| + 1e-4)`` at the decoder's last layer W (clamped to
    ``max_adaptive_weight``; 1 when ``adaptive`` is off), as in taming-transformers / LDM. The
    discriminator trains from ``start_step`` on too (its own AdamW, constant ``lr``).
    """

    weight: float = 0.0  # 0 disables the discriminator entirely (never built)
    start_step: int = 0  # generator and discriminator terms start at this optimizer step
    adaptive: bool = True
    max_adaptive_weight: float = 1.0e4
    loss: str = "hinge"  # discriminator loss: "hinge" | "non-saturating"
    disc_channels: int = 64  # PatchGAN base width
    disc_layers: int = 3  # PatchGAN strided conv layers
    disc_norm: str = "group"  # "group" (batch-independent: DDP/accumulation exact) | "batch" (taming)
    disc_in_channels: int = 3  # image channels the discriminator sees
    lr: float = 1.0e-4  # discriminator AdamW (constant)
    betas: tuple[float, float] = (0.5, 0.9)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.weight < 0:
            raise ConfigError(f"gan.weight must be >= 0 (0 disables), got {self.weight}")
        if self.start_step < 0:
            raise ConfigError(f"gan.start_step must be >= 0, got {self.start_step}")
        if self.loss not in GAN_LOSSES:
            raise ConfigError(f"gan.loss must be one of {', '.join(GAN_LOSSES)}, got {self.loss!r}")
        if self.disc_norm not in DISC_NORMS:
            raise ConfigError(f"gan.disc_norm must be one of {', '.join(DISC_NORMS)}, got {self.disc_norm!r}")
        if self.disc_channels < 1 or self.disc_layers < 1 or self.disc_in_channels < 1:
            raise ConfigError("gan.disc_channels, gan.disc_layers and gan.disc_in_channels must be >= 1")
        if self.lr <= 0 or self.max_adaptive_weight <= 0:
            raise ConfigError("gan.lr and gan.max_adaptive_weight must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"gan.betas must be two numbers in [0, 1), got {list(self.betas)}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def active(self, step: int) -> bool:
        """Whether the generator and discriminator terms are on at optimizer step ``step``."""
        return self.enabled and step >= self.start_step


# ------------------------------------------------------------------------------------ discriminator
def _disc_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    groups = 32 if channels % 32 == 0 else max(g for g in (16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: images ``[B, C, H, W]`` -> patch logits ``[B, 1, h, w]`` (see the module docstring)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "group") -> None:
        super().__init__()
        if norm not in DISC_NORMS:
            raise ConfigError(f"discriminator norm must be one of {', '.join(DISC_NORMS)}, got {norm!r}")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1  # the last hidden conv keeps the resolution (pix2pix)
            seq += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), _disc_norm(norm, out),
                    nn.LeakyReLU(0.2)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def build_discriminator(cfg: GANConfig) -> NLayerDiscriminator:
    return NLayerDiscriminator(cfg.disc_in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm)


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of ``module``'s parameters inside the block (restored afterwards).

    Autograd records at forward time which leaves need gradients, so a generator loss computed through
    the discriminator inside this block never writes into the discriminator's ``.grad`` -- even though
    its backward runs after the block has ended.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ------------------------------------------------------------------------------------ losses
def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The discriminator's loss (lower is better for D) from its logits on real and reconstructed images."""
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind == "non-saturating":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise ConfigError(f"GAN loss must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's (decoder's) adversarial loss from D's logits on reconstructions."""
    fake = logits_fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "non-saturating":
        return F.softplus(-fake).mean()
    raise ConfigError(f"GAN loss must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1.0e4, sync: bool = True) -> torch.Tensor:
    """``||grad_W rec|| / (||grad_W g|| + 1e-4)``, clamped to ``[0, max_weight]``, detached (0-d fp32).

    Both gradients are taken with ``retain_graph=True`` (the training backward comes later) and do not
    touch any ``.grad``. ``sync``: under DDP, average the two gradients over processes first.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].float()
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].float()
    if sync and distributed.is_distributed():
        both = distributed.all_reduce_sum(torch.stack([rec_grad, g_grad])) / distributed.world_size()
        rec_grad, g_grad = both[0], both[1]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


__all__ = ["GANConfig", "GAN_LOSSES", "DISC_NORMS", "NLayerDiscriminator", "build_discriminator",
           "frozen_parameters", "discriminator_loss", "generator_loss", "adaptive_weight"]
