"""Training objectives shared by the tokenizers: L1 + perceptual (+ optional GAN) reconstruction.

Every built-in tokenizer's criterion is a :class:`TokenizerCriterion`: an ``nn.Module`` called by the
engine as ``criterion(model, batch, step) -> (loss, logs)``. ``model`` may be wrapped (DDP,
torch.compile): call ``model(x)`` for the forward so DDP synchronises gradients, and reach the
tokenizer's own attributes with :func:`manifold_lab.train.unwrap_model`. ``logs`` are detached 0-d
tensors (the engine averages them without a device sync each step).

The frozen perceptual network is cached outside the module (it is a training aid, not part of any
checkpoint); the discriminator, when the GAN is on, is the only trainable state a criterion holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from manifold_lab.train.gan import GANConfig

_PERCEPTUAL_CACHE: dict[tuple[str, str], nn.Module] = {}


def perceptual_distance(name: str, device: torch.device | str) -> nn.Module:
    """A frozen perceptual distance (``forward(x, y) -> [B]``), built once per (name, device)."""
    key = (name, str(device))
    if key not in _PERCEPTUAL_CACHE:
        from manifold_lab.metrics.perceptual import build_perceptual_distance

        net = build_perceptual_distance(name).to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        _PERCEPTUAL_CACHE[key] = net
    return _PERCEPTUAL_CACHE[key]


def batch_images(batch: Any) -> torch.Tensor:
    """Images of a batch that is either images or (images, labels, ...)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class ReconstructionLoss(nn.Module):
    """``l1_weight * |x - x_rec| + perceptual_weight * P(x, x_rec)`` (+ the adaptive GAN term).

    ``forward(x, recon, step, last_layer=None) -> (loss, logs)``; ``last_layer`` is the decoder's output
    weight (``tokenizer.last_layer()``), needed only for the adaptive GAN weight.
    ``discriminator_loss(step) -> (loss, logs) | None`` trains the discriminator on the last (x, recon)
    pair seen by ``forward`` (detached); None when the GAN is off or has not started.
    """

    def __init__(self, l1_weight: float = 1.0, perceptual_weight: float = 1.0, perceptual_name: str = "auto",
                 gan: GANConfig | None = None) -> None:
        super().__init__()
        self.l1_weight = float(l1_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual_name = perceptual_name
        self.gan = gan if gan is not None else GANConfig()
        if self.gan.enabled:
            raise NotImplementedError("the GAN term is not built yet")  # replaced by the GAN implementation
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, recon: torch.Tensor, step: int,
                last_layer: nn.Parameter | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        l1 = (recon.float() - x.float()).abs().mean()
        loss = self.l1_weight * l1
        logs = {"l1": l1.detach()}
        if self.perceptual_weight > 0:
            p = perceptual_distance(self.perceptual_name, x.device)(recon, x).float().mean()
            loss = loss + self.perceptual_weight * p
            logs["perceptual"] = p.detach()
        return loss, logs

    def discriminator_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        return None


class TokenizerCriterion(nn.Module):
    """Base of every tokenizer's training criterion: holds ``self.recon`` and delegates the GAN hooks.

    Subclasses implement ``forward(model, batch, step) -> (loss, logs)``, typically
    ``rec, logs = self.recon(x, x_rec, step, last_layer=unwrap_model(model).last_layer())`` plus their
    regularisers.
    """

    def __init__(self, recon: ReconstructionLoss) -> None:
        super().__init__()
        self.recon = recon

    def discriminator_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        return self.recon.discriminator_loss(step)
