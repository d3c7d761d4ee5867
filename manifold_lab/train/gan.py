"""Adversarial training parts shared by every tokenizer: the GAN settings (and, to come, the PatchGAN
discriminator, its losses and the adaptive weight).

The engine trains a discriminator when the training criterion (an ``nn.Module``) has trainable
parameters and a ``discriminator_loss(step)`` method; see :class:`manifold_lab.tokenizers.losses.TokenizerCriterion`.
"""

from __future__ import annotations

from dataclasses import dataclass

from manifold_lab.errors import ConfigError

GAN_LOSSES = ("hinge", "non-saturating")


@dataclass
class GANConfig:
    """The optional GAN term of a tokenizer's reconstruction loss (``weight = 0`` switches it off).

    Generator term: ``weight * adaptive * g_loss`` from ``start_step`` on, where ``adaptive =
    ||grad_W rec|| / (||grad_W g_loss|| + 1e-4)`` at the decoder's last layer W (clamped to
    ``max_adaptive_weight``; 1 when ``adaptive`` is off), as in taming-transformers / LDM.
    """

    weight: float = 0.0  # 0 disables the discriminator entirely (never built)
    start_step: int = 0  # generator and discriminator terms start at this optimizer step
    adaptive: bool = True
    max_adaptive_weight: float = 1.0e4
    loss: str = "hinge"  # discriminator loss: "hinge" | "non-saturating"
    disc_channels: int = 64  # PatchGAN base width
    disc_layers: int = 3  # PatchGAN strided conv layers
    lr: float = 1.0e-4  # discriminator AdamW
    betas: tuple[float, float] = (0.5, 0.9)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.weight < 0:
            raise ConfigError(f"gan.weight must be >= 0 (0 disables), got {self.weight}")
        if self.start_step < 0:
            raise ConfigError(f"gan.start_step must be >= 0, got {self.start_step}")
        if self.loss not in GAN_LOSSES:
            raise ConfigError(f"gan.loss must be one of {', '.join(GAN_LOSSES)}, got {self.loss!r}")
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ConfigError("gan.disc_channels and gan.disc_layers must be >= 1")
        if self.lr <= 0 or self.max_adaptive_weight <= 0:
            raise ConfigError("gan.lr and gan.max_adaptive_weight must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"gan.betas must be two numbers in [0, 1), got {list(self.betas)}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0
