"""SVG, "Latent Diffusion Model without Variational Autoencoder" (Shi et al. 2025): frozen
self-supervised tokens plus a few channels from a light residual encoder, decoded by a conv decoder.

Written from the paper and a reading of the reference code (github.com/shiml20/SVG:
``autoencoder/ldm/models/dino_decoder.py``, ``autoencoder/ldm/modules/losses/contperceptual_decoder.py``,
``autoencoder/configs/example_svg_autoencoder_vitsp.yaml``); no code is copied.

Latent = concat(frozen VFM tokens, residual channels) along channels:
    paper: DINOv3 ViT-S/16+ ``x_norm_patchtokens`` (final norm WITH affine, 384 ch) + 8 residual
    channels = 392 x 16 x 16 at 256 px. CPU: mobilenet_v2 96 + 8 = 104 x 8 x 8 at 32 px.
    ``encode`` returns that raw concatenation; the per-channel ``latent_stats`` of TokenizerBase
    (computed after training) are what the diffusion model normalises with.

Residual encoder (SVG's ``create_small_vit_s``):
    the encoder-normalised image (ImageNet mean/std, as SVG feeds its ``x_dino`` to both branches)
    -> patch embedding on the SAME grid as the frozen tokens (patch = image_size / grid) -> a CLS
    token and learned positions -> ``residual_depth`` timm pre-norm blocks (paper: 6 blocks, width
    384, 8 heads, MLP 1536, dropout and attention dropout 0.1) -> final LayerNorm -> CLS dropped ->
    head Linear(w, w) - GELU - Linear(w, residual_channels).

Mask-token dropout (SVG's ``mask_ratio``, 10%):
    what SVG masks is the residual OUTPUT, per SAMPLE: during training each sample is drawn with
    probability ``mask_ratio`` and then ALL its residual tokens are replaced by one learned mask
    vector (``mask_token`` of shape (1, C_res, 1), init N(0, 0.02)), before distribution matching.
    The decoder thus learns to reconstruct from the frozen tokens alone on those samples.
    ``mask_unit: token`` replaces individual tokens instead (not in SVG; an ablation switch).

Distribution matching (SVG's ``match_distribution``, ``use_outnorm: true``), ``residual_mode: matched``:
    with scalar statistics, each the channel-average of per-channel statistics over (batch, tokens)
    (``std`` unbiased), all detached::

        m_f = mean_c E[f_c],  s_f = mean_c std[f_c]       (frozen tokens)
        m_r = mean_c E[r_c],  s_r = mean_c std[r_c]       (residual output)
        r' = (r - m_r) / (s_r + 1e-6) * s_f + m_f

    so the residual channels sit on the same overall scale as the frozen features. SVG computes these
    on every batch, at eval too, which makes a latent depend on the other images of its batch. Here
    the TRAINING forward uses the batch statistics exactly like SVG and updates running averages
    (buffers ``match_stats`` = [m_f, s_f, m_r, s_r], momentum ``match_momentum``, BatchNorm-style);
    ``encode`` (and eval-mode forward) uses the running values, so it is deterministic per image.
    ``residual_mode: plain_concat`` skips the matching (their ablation: gFID 6.12 -> 9.03).
    (SVG also builds a LayerNorm ``norm_vit`` over the 392 channels that its forward never uses; not
    reproduced.)

Decoder: an LDM-style conv decoder, :class:`manifold_lab.tokenizers.vae.Decoder` (ResNet blocks,
    mid attention, nearest upsampling; paper: ch 128, ch_mult 1,1,2,2,4, 2 ResNet blocks per stage).
    SVG's LDM decoder also has attention blocks in its 16x16 up-stage (``attn_resolutions: [16]``);
    this one has attention only in its middle block, at the same 16x16 resolution.

Loss: ``l1 * |x - x_rec| + perceptual * LPIPS + adaptive GAN`` via :class:`ReconstructionLoss` (SVG: LDM's
    ``LPIPSWithDiscriminator`` without KL: L1 + 1.0 LPIPS, PatchGAN hinge, disc_weight 0.5 from step
    5001; Adam lr 1e-4, betas (0.5, 0.9), batch 64 x 8 GPUs). Trained: residual encoder, mask token,
    decoder. DiT side (diffusion issue): qk-norm, time shift 0.4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from timm.models.vision_transformer import Block
from torch import nn

from manifold_lab.errors import ConfigError
from manifold_lab.nn import to_grid
from manifold_lab.tokenizers.base import FixedGridTokenizer
from manifold_lab.tokenizers.losses import ReconstructionCriterion
from manifold_lab.tokenizers.rae import build_frozen_encoder
from manifold_lab.tokenizers.registry import TokenizerSpec, register_tokenizer
from manifold_lab.tokenizers.vae import Decoder, VAEConfig
from manifold_lab.train.gan import GANConfig

RECIPES = Path(__file__).resolve().parent / "recipes"
MATCH_EPS = 1e-6


@dataclass
class SVGConfig:
    """Architecture and loss weights; the defaults are the CPU recipe (32x32 -> (96+8)x8x8)."""

    image_size: int = 32
    in_channels: int = 3
    encoder: str = "mobilenet_v2"
    encoder_weights: str | None = None
    encoder_input_size: int | None = None
    final_norm_affine: bool = True  # SVG uses DINOv3's normed patch tokens (affine kept)
    residual_channels: int = 8
    residual_width: int = 64
    residual_depth: int = 2
    residual_heads: int = 4
    residual_mlp_ratio: float = 4.0
    residual_dropout: float = 0.0
    residual_mode: Literal["matched", "plain_concat"] = "matched"
    mask_ratio: float = 0.1
    mask_unit: Literal["sample", "token"] = "sample"
    match_momentum: float = 0.01
    decoder_channels: int = 32
    decoder_ch_mult: tuple[int, ...] = (1, 2, 2)
    decoder_res_blocks: int = 1
    decoder_mid_attention: bool = True
    decoder_norm_groups: int = 8
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_name: str = "auto"
    gan: GANConfig = field(default_factory=GANConfig)

    def __post_init__(self) -> None:
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        for key in ("image_size", "residual_channels", "residual_width", "residual_depth", "residual_heads",
                    "decoder_channels", "decoder_res_blocks", "decoder_norm_groups"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"svg: {key} must be positive, got {getattr(self, key)}")
        if self.in_channels != 3:
            raise ConfigError(f"svg: in_channels must be 3 (the frozen encoder takes RGB), got {self.in_channels}")
        if not self.decoder_ch_mult or any(m <= 0 for m in self.decoder_ch_mult):
            raise ConfigError(f"svg: decoder_ch_mult must be positive integers, got {list(self.decoder_ch_mult)}")
        if self.residual_width % self.residual_heads:
            raise ConfigError(f"svg: residual_width {self.residual_width} is not divisible by residual_heads "
                              f"{self.residual_heads}")
        if self.residual_mode not in ("matched", "plain_concat"):
            raise ConfigError(f"svg: residual_mode must be 'matched' or 'plain_concat', got {self.residual_mode!r}")
        if self.mask_unit not in ("sample", "token"):
            raise ConfigError(f"svg: mask_unit must be 'sample' or 'token', got {self.mask_unit!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"svg: mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.residual_dropout < 1.0:
            raise ConfigError(f"svg: residual_dropout must be in [0, 1), got {self.residual_dropout}")
        if not 0.0 < self.match_momentum <= 1.0:
            raise ConfigError(f"svg: match_momentum must be in (0, 1], got {self.match_momentum}")
        if self.residual_mlp_ratio <= 0 or self.l1_weight < 0 or self.perceptual_weight < 0:
            raise ConfigError("svg: residual_mlp_ratio must be > 0, l1_weight and perceptual_weight >= 0")


class ResidualViT(nn.Module):
    """SVG's light residual encoder: image (already encoder-normalised) -> (B, C_res, h, w)."""

    def __init__(self, grid: tuple[int, int], patch: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 dropout: float, out_channels: int) -> None:
        super().__init__()
        self.grid = grid
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.empty(1, grid[0] * grid[1] + 1, width).normal_(std=0.02))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout,
                                          attn_drop=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = self.drop(tokens + self.pos_embed.to(tokens.dtype))
        for block in self.blocks:
            tokens = block(tokens)
        return to_grid(self.head(self.norm(tokens)[:, 1:]), self.grid)


def scalar_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SVG's scalar statistics of a (B, C, h, w) map: channel-mean of per-channel mean and of per-channel
    (unbiased) std over batch and positions."""
    per_channel = h.detach().float().transpose(0, 1).flatten(1)  # (C, B*h*w)
    return per_channel.mean(1).mean(), per_channel.std(1).mean()


def match_distribution(residual: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``(r - m_r) / (s_r + eps) * s_f + m_f`` with ``stats = [m_f, s_f, m_r, s_r]`` (no gradient through them)."""
    m_f, s_f, m_r, s_r = (s.to(residual.dtype) for s in stats.detach())
    return (residual - m_r) / (s_r + MATCH_EPS) * s_f + m_f


class SVG(FixedGridTokenizer):
    """Frozen VFM tokens + distribution-matched residual channels, LDM conv decoder."""

    name = "svg"
    grid_note = "the residual encoder's fixed patch grid"

    def __init__(self, config: SVGConfig | None = None) -> None:
        config = config if config is not None else SVGConfig()
        enc = build_frozen_encoder(config.encoder, config.encoder_weights, config.encoder_input_size,
                                   config.final_norm_affine)
        gh, gw = enc.grid_size
        patch = self.grid_patch("svg", config.image_size, (gh, gw))
        up = 2 ** (len(config.decoder_ch_mult) - 1)
        if up != patch:
            raise ConfigError(f"svg: the decoder upsamples x{up} (len(decoder_ch_mult) - 1 stages) but image_size "
                              f"{config.image_size} / grid {gh} needs x{patch}; use {patch.bit_length()} decoder_ch_mult "
                              "entries (image_size / grid must be a power of 2)")
        z_channels = enc.embed_dim + config.residual_channels
        super().__init__(config, config.image_size, config.in_channels, z_channels, downsample=patch)
        self.attach_frozen("encoder", enc)
        self.grid = (gh, gw)
        self.vfm_channels = enc.embed_dim
        self.residual = ResidualViT(self.grid, patch, config.residual_width, config.residual_depth,
                                    config.residual_heads, config.residual_mlp_ratio, config.residual_dropout,
                                    config.residual_channels)
        self.mask_token = nn.Parameter(torch.empty(1, config.residual_channels, 1, 1).normal_(std=0.02))
        # running [m_f, s_f, m_r, s_r] for deterministic encoding (identity matching until trained)
        self.register_buffer("match_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.decoder = Decoder(VAEConfig(
            image_size=config.image_size, in_channels=config.in_channels, base_channels=config.decoder_channels,
            ch_mult=config.decoder_ch_mult, num_res_blocks=config.decoder_res_blocks,
            mid_attention=config.decoder_mid_attention, z_channels=z_channels,
            norm_groups=config.decoder_norm_groups))

    # ----- the two branches ------------------------------------------------------------------------
    def residual_features(self, x: torch.Tensor) -> torch.Tensor:
        """The residual encoder's raw output (B, C_res, h, w), before masking and matching."""
        enc = self.frozen("encoder")
        x_norm = ((x + 1.0) * 0.5 - enc.pixel_mean.to(x.dtype)) / enc.pixel_std.to(x.dtype)
        return self.residual(x_norm)

    def apply_mask(self, r: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask-token dropout: (masked r, mask of shape (B,1,1,1) or (B,1,h,w), 1 = replaced)."""
        b, _, h, w = r.shape
        shape = (b, 1, 1, 1) if self.config.mask_unit == "sample" else (b, 1, h, w)
        mask = (torch.rand(shape, generator=generator, device=r.device) < self.config.mask_ratio).to(r.dtype)
        return r * (1 - mask) + self.mask_token.to(r.dtype) * mask, mask

    def combine(self, f: torch.Tensor, r: torch.Tensor, train: bool) -> torch.Tensor:
        """Concatenate frozen tokens and residual channels (matched in ``matched`` mode)."""
        if self.config.residual_mode == "matched":
            if train:
                m_f, s_f = scalar_stats(f)
                m_r, s_r = scalar_stats(r)
                batch = torch.stack([m_f, s_f, m_r, s_r]).to(self.match_stats)
                with torch.no_grad():
                    self.match_stats.lerp_(batch, self.config.match_momentum)
                stats = batch
            else:
                stats = self.match_stats
            r = match_distribution(r, stats)
        return torch.cat([f.to(r.dtype), r], dim=1)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.frozen("encoder")(x), self.residual_features(x), train=False)

    @torch.no_grad()
    def reference_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen VFM features alone (:class:`~manifold_lab.tokenizers.base.HasReferenceMaps`): the
        latent's first channels, before the residual channels are added."""
        self.check_images(x)
        return {"vfm_features": self.frozen("encoder")(x).float()}

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward (mask-token dropout and batch-statistics matching when training)."""
        self.check_images(x)
        f = self.frozen("encoder")(x)
        r = self.residual_features(x)
        if self.training and self.config.mask_ratio > 0:
            r, _ = self.apply_mask(r)
        return self.decoder(self.combine(f, r, train=self.training))

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight


#: L1 + LPIPS (+ adaptive GAN) on the reconstruction.
SVGCriterion = ReconstructionCriterion


SVG_SPEC = register_tokenizer(TokenizerSpec(
    name="svg",
    config_cls=SVGConfig,
    build=SVG,
    criterion=SVGCriterion,
    default_recipe=RECIPES / "svg_cpu.yaml",
    paper_recipe=RECIPES / "svg_imagenet256.yaml",
    description="SVG: frozen VFM tokens + matched residual ViT channels (mask-token dropout), LDM conv decoder",
))
