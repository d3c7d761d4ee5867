"""The LDM-style KL autoencoder ("VAE"): the baseline every latent-geometry study compares against.

Architecture (after Rombach et al., written from the paper's description): a convolutional ResNet
encoder (GroupNorm + SiLU residual blocks, one stage per ``ch_mult`` entry, a stride-2 conv between
stages), a middle block ResNet -> single-head self-attention -> ResNet, and a head giving the mean
and log-variance of a diagonal Gaussian posterior with ``z_channels`` channels. The decoder mirrors
it with nearest-neighbour upsampling. ``encode`` returns the posterior mean.

Training objective (:class:`VAECriterion`), per image and divided by its number of pixels so that
the weights mean what they mean in LDM's summed objective (``LPIPSWithDiscriminator`` in
``CompVis/latent-diffusion`` ``ldm/modules/losses/contperceptual.py``, with its learned log-variance
fixed at 0)::

    rec  = mean|x - x_rec| + perceptual_weight * P(x, x_rec)
    loss = rec + kl_weight * KL(q(z|x) || N(0, I)) / (3*H*W)
           + [step >= gan.start_step] * gan.weight * adaptive * g_loss(D(x_rec))

where P is ``manifold_lab.metrics.perceptual.build_perceptual_distance(perceptual_name)``
(``perceptual_weight = 0`` switches it off and never builds it), D is the PatchGAN of
:mod:`manifold_lab.train.gan` (built only when ``gan.weight > 0``; the engine trains it with its own
optimizer after every step) and ``adaptive = ||grad_W rec|| / (||grad_W g_loss|| + 1e-4)`` at the
decoder's output conv W (:meth:`VAE.last_layer`). The adaptive weight is a ratio of gradient norms,
so dividing LDM's per-image sums by the pixel count leaves the rec/GAN balance exactly as in LDM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from manifold_lab.errors import ConfigError
from manifold_lab.tokenizers.base import TokenizerBase
from manifold_lab.tokenizers.losses import ReconstructionLoss, TokenizerCriterion, batch_images
from manifold_lab.tokenizers.registry import TokenizerSpec, register_tokenizer
from manifold_lab.train.engine import unwrap_model
from manifold_lab.train.gan import GANConfig

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # as in LDM: keeps exp(logvar) finite early in training


@dataclass
class VAEConfig:
    """Architecture and loss weights; the defaults are the CPU recipe (32x32 -> 4x8x8, f4)."""

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 16
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    mid_attention: bool = True
    z_channels: int = 4
    dropout: float = 0.0
    norm_groups: int = 8
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual_name: str = "auto"
    gan: GANConfig = field(default_factory=GANConfig)  # weight 0 (default): no discriminator

    def __post_init__(self) -> None:
        if isinstance(self.gan, dict):
            self.gan = GANConfig(**self.gan)
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ConfigError(f"vae: ch_mult must be a non-empty list of positive integers, got {list(self.ch_mult)}")
        for key in ("image_size", "in_channels", "base_channels", "num_res_blocks", "z_channels", "norm_groups"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"vae: {key} must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"vae: dropout must be in [0, 1), got {self.dropout}")
        if self.kl_weight < 0 or self.perceptual_weight < 0:
            raise ConfigError("vae: kl_weight and perceptual_weight must be >= 0")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual path (1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (timm's fused attention)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.attn = Attention(channels, num_heads=1, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int, attention: bool) -> None:
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image -> 2*z_channels maps (posterior mean and log-variance)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.base_channels * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.stages = nn.ModuleList()
        ch = cfg.base_channels
        for i, width in enumerate(widths):
            stage = nn.Module()
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, width, cfg.dropout, g))
                ch = width
            stage.blocks = nn.ModuleList(blocks)
            stage.down = Downsample(ch) if i < len(widths) - 1 else nn.Identity()
            self.stages.append(stage)
        self.mid = MidBlock(ch, cfg.dropout, g, cfg.mid_attention)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.stages:
            for block in stage.blocks:
                h = block(h)
            h = stage.down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_channels maps -> image, mirroring the encoder (one extra ResNet block per stage, as LDM)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.base_channels * m for m in cfg.ch_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, cfg.dropout, g, cfg.mid_attention)
        self.stages = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            stage = nn.Module()
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, width, cfg.dropout, g))
                ch = width
            stage.blocks = nn.ModuleList(blocks)
            stage.up = Upsample(ch) if i > 0 else nn.Identity()
            self.stages.append(stage)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.stages:
            for block in stage.blocks:
                h = block(h)
            h = stage.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), log-variance clamped as in LDM."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over all latent elements: one value per image, shape [B]."""
        mean, logvar = self.mean.float(), self.logvar.float()  # summed over many elements: keep fp32 under bf16
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class VAE(TokenizerBase):
    """KL autoencoder with spatial factor ``2 ** (len(ch_mult) - 1)``."""

    name = "vae"

    def __init__(self, config: VAEConfig | None = None) -> None:
        config = config if config is not None else VAEConfig()
        super().__init__(config, config.image_size, config.in_channels, config.z_channels,
                         downsample=2 ** (len(config.ch_mult) - 1))
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight: where the adaptive GAN weight compares gradient norms (LDM)."""
        return self.decoder.conv_out.weight

    def supports_resolution(self, size: int) -> bool:
        return int(size) >= 8 and int(size) % self.downsample == 0

    def resolution_rule(self) -> str:
        return f"H and W multiples of {self.downsample} and >= 8"

    def encode_posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """The full posterior q(z|x) (validated input), for training and sampling."""
        self.check_images(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return DiagonalGaussian(self.quant_conv(self.encoder(x))).mean

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior); ``sample=False`` decodes the posterior mean."""
        posterior = self.encode_posterior(x)
        z = posterior.sample() if sample else posterior.mode()
        return self._decode(z), posterior


class VAECriterion(TokenizerCriterion):
    """The VAE's training objective (module docstring): L1 + perceptual (+ adaptive PatchGAN) + KL.

    ``criterion(model, batch, step) -> (loss, logs)``; batch is images or (images, labels). Logs:
    ``l1``, ``perceptual`` (when used), ``kl`` (per image, summed over latent elements), and from
    ``gan.start_step`` on ``gan_g``/``gan_adaptive``; the discriminator's own loss is logged by the
    engine's discriminator step. ``model`` may be wrapped (DDP, torch.compile): the forward goes
    through the wrapper, ``last_layer`` comes from the unwrapped module.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(ReconstructionLoss(l1_weight=1.0, perceptual_weight=config.perceptual_weight,
                                            perceptual_name=config.perceptual_name, gan=config.gan))
        self.kl_weight = float(config.kl_weight)

    def forward(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch_images(batch)
        recon, posterior = model(x)
        last = unwrap_model(model).last_layer() if self.recon.gan.active(step) else None
        rec, logs = self.recon(x, recon, step, last_layer=last)
        kl = posterior.kl().float().mean()  # per image, summed over latent elements
        loss = rec + self.kl_weight * (kl / x[0].numel())
        logs["kl"] = kl.detach()  # 0-d tensors: the engine averages them without a device sync
        return loss, logs


def vae_loss(model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:class:`VAECriterion` as a plain function, WITHOUT the GAN term (a function cannot own a
    discriminator); kept for code that calls the loss directly. Training uses the criterion."""
    cfg: VAEConfig = unwrap_model(model).config
    return VAECriterion(replace(cfg, gan=GANConfig()))(model, batch, step)


VAE_SPEC = register_tokenizer(TokenizerSpec(
    name="vae",
    config_cls=VAEConfig,
    build=VAE,
    loss=vae_loss,  # GAN-free plain-function form; training uses the criterion
    criterion=VAECriterion,
    default_recipe=Path(__file__).resolve().parent / "recipes" / "vae_cpu.yaml",
    paper_recipe=Path(__file__).resolve().parent / "recipes" / "vae_imagenet256.yaml",
    description="LDM-style KL autoencoder (conv ResNet, mid attention, diagonal Gaussian posterior)",
))
