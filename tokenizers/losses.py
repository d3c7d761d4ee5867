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

from manifold_lab.train.config import OptimConfig
from manifold_lab.train.gan import (GANConfig, adaptive_weight, build_discriminator, discriminator_loss,
                                    frozen_parameters, generator_loss)

#: (x, recon) pairs kept for the discriminator; the engine consumes them after every optimizer step
MAX_PENDING = 256

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

    With ``gan.enabled`` the module owns a PatchGAN (``self.discriminator``, see
    :mod:`manifold_lab.train.gan`). From ``gan.start_step`` on, ``forward`` adds
    ``gan.weight * adaptive * g_loss`` where ``adaptive = ||grad_W rec|| / (||grad_W g|| + 1e-4)`` is
    computed against the L1 + perceptual part ``rec`` at ``last_layer`` (1 when ``gan.adaptive`` is
    off or ``last_layer`` is None), logs ``gan_g`` and ``gan_adaptive``, and remembers ``(x, recon)``
    (detached). The discriminator's parameters are frozen while the generator term is built, so the
    generator's backward never writes into their ``.grad``.

    ``discriminator_loss(step) -> (loss, logs) | None`` trains the discriminator on the remembered
    pairs, oldest first, one call per remembered pair (the engine calls it after the generator's
    optimizer step until none is pending); None when the GAN is off, has not started, or nothing is
    pending. Call ``forward`` once per micro-batch with the real images (``adversarial=False`` for
    any other call).
    """

    def __init__(self, l1_weight: float = 1.0, perceptual_weight: float = 1.0, perceptual_name: str = "auto",
                 gan: GANConfig | None = None) -> None:
        super().__init__()
        self.l1_weight = float(l1_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual_name = perceptual_name
        self.gan = gan if gan is not None else GANConfig()
        # the only trainable state of a criterion; absent (not None-valued) when the GAN is off, so the
        # criterion's state dict stays empty and nothing changes for GAN-free training
        if self.gan.enabled:
            self.discriminator = build_discriminator(self.gan)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, recon: torch.Tensor, step: int,
                last_layer: nn.Parameter | None = None,
                adversarial: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``adversarial=False``: L1 + perceptual only, nothing remembered for the discriminator (for
        auxiliary terms whose target is not a real image, e.g. a consistency loss between two decodes)."""
        l1 = (recon.float() - x.float()).abs().mean()
        loss = self.l1_weight * l1
        logs = {"l1": l1.detach()}
        if self.perceptual_weight > 0:
            p = perceptual_distance(self.perceptual_name, x.device)(recon, x).float().mean()
            loss = loss + self.perceptual_weight * p
            logs["perceptual"] = p.detach()
        if adversarial and self.gan.active(step):
            with frozen_parameters(self.discriminator):  # D's own step must not see generator gradients
                g_loss = generator_loss(self.discriminator(recon.contiguous()), self.gan.loss)
            weight = self._adaptive(loss, g_loss, last_layer)
            loss = loss + self.gan.weight * weight * g_loss
            logs["gan_g"] = g_loss.detach()
            logs["gan_adaptive"] = weight.detach()
            if torch.is_grad_enabled():  # a training forward: D trains on this pair after the optimizer step
                self._pending.append((x.detach(), recon.detach()))
                del self._pending[:-MAX_PENDING]  # a hand-written loop that never trains D must not leak
        return loss, logs

    def _adaptive(self, rec_loss: torch.Tensor, g_loss: torch.Tensor,
                  last_layer: torch.Tensor | None) -> torch.Tensor:
        one = torch.ones((), device=g_loss.device)
        if not self.gan.adaptive or last_layer is None or not torch.is_grad_enabled():
            return one
        if not (last_layer.requires_grad and rec_loss.requires_grad and g_loss.requires_grad):
            return one
        return adaptive_weight(rec_loss, g_loss, last_layer, self.gan.max_adaptive_weight)

    # ------------------------------------------------------------------ discriminator side (engine hooks)
    def discriminator_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """D's loss on the oldest (x, recon) pair remembered by ``forward`` (FIFO, one per micro-batch).

        None when the GAN is off, has not started at ``step``, or no pair is pending. Logs ``gan_d``,
        ``logits_real`` and ``logits_fake`` (mean logits).
        """
        if not self.gan.active(step) or not self._pending:
            self._pending.clear()
            return None
        x, recon = self._pending.pop(0)
        logits_real = self.discriminator(x.contiguous())
        logits_fake = self.discriminator(recon.contiguous())
        loss = discriminator_loss(logits_real, logits_fake, self.gan.loss)
        logs = {"gan_d": loss.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}
        return loss, logs

    def pending_discriminator_batches(self) -> int:
        """How many micro-batches ``discriminator_loss`` will still train on."""
        return len(self._pending)

    def clear_discriminator_batches(self) -> None:
        self._pending.clear()

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The parameters the engine's discriminator optimizer updates (empty without a GAN)."""
        return list(self.discriminator.parameters()) if self.gan.enabled else []

    def discriminator_optim_config(self) -> OptimConfig | None:
        """AdamW settings of the discriminator (constant lr, no weight decay); None without a GAN."""
        if not self.gan.enabled:
            return None
        return OptimConfig(lr=self.gan.lr, betas=self.gan.betas, weight_decay=0.0, warmup_steps=0,
                           schedule="constant")


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

    def pending_discriminator_batches(self) -> int:
        return self.recon.pending_discriminator_batches()

    def clear_discriminator_batches(self) -> None:
        self.recon.clear_discriminator_batches()

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return self.recon.discriminator_parameters()

    def discriminator_optim_config(self) -> OptimConfig | None:
        return self.recon.discriminator_optim_config()


class ReconstructionCriterion(TokenizerCriterion):
    """The whole objective of tokenizers trained by reconstruction alone (RAE, SVG): ``model(x)`` returns
    the reconstruction, scored by :class:`ReconstructionLoss` with the config's ``l1_weight``,
    ``perceptual_weight``, ``perceptual_name`` and ``gan`` (adaptive weight at ``last_layer()``)."""

    def __init__(self, config: Any) -> None:
        super().__init__(ReconstructionLoss(config.l1_weight, config.perceptual_weight, config.perceptual_name,
                                            gan=config.gan))

    def forward(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from manifold_lab.train import unwrap_model

        x = batch_images(batch)
        return self.recon(x, model(x), step, last_layer=unwrap_model(model).last_layer())
