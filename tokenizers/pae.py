"""PAE, the Prior-Aligned AutoEncoder (Yue et al., arXiv 2605.07915): the toolkit's headline tokenizer.

Why it exists: PAE's claim is that what makes a latent *diffusion-friendly* is not reconstruction but
three geometric properties of the latent manifold -- spatial structure coherence, local continuity
and global semantics -- and that each can be trained in directly by a regulariser (SSR, MCR, SCR)
against a frozen vision foundation model (VFM). Every part its ablations need is a config switch here.

Architecture (after the paper and its public release; the release's own training code is not public,
so where the paper leaves a detail open the choice is stated below)::

    x --> frozen VFM --> F (B,D,h,w)          F = the VFM's patch tokens through a LayerNorm without
     |                                         affine (for DINOv2 built with final_norm_affine=False
     |                                         that norm IS the VFM's last layer; otherwise it is
     |                                         applied here, see ``feature_norm``)
     +--> DAM: pixel patch tokens (same grid, sin-cos positions), ``dam_depth`` pre-norm blocks of
     |         self-attention, cross-attention (queries: pixel tokens; keys/values: F) and MLP,
     |         then SFT: Linear(W -> 2D), ZERO weight and bias -> gamma, beta
     |    H = LN(F * (1 + gamma) + beta)      (LayerNorm without affine)
     +--> compressor: ``compressor_depth`` attention blocks, 3x3 conv D -> C,
          per-token RMS normalisation without affine (each token's C-vector has RMS 1)  ==> z
    z --> decompressor: 3x3 conv C -> D, ``decompressor_depth`` attention blocks --> ViT decoder --> x'

"At initialisation the DAM path returns exactly the frozen features": F is already LayerNorm'ed, so
LN(F) = F up to LayerNorm's eps and float rounding, not bit-exactly. The fusion is therefore
computed as ``H = F + (LN(F(1+gamma)+beta) - LN(F))``, which is the paper's LN(F(1+gamma)+beta) up to
that ~1e-7 idempotence error, has the same gradients (LN(F) is a constant), and is *bit-exactly* F
while gamma = beta = 0 (x*1+0 == x in IEEE arithmetic, so both LayerNorms see identical inputs).

Fusion ablations (``fusion``): ``dam`` (above); ``finetune`` (no DAM: a trainable copy of the VFM
is a real submodule, in the state dict, and its LN'ed tokens are H; the frozen VFM is still used
for the targets; BatchNorm statistics of a CNN encoder stay frozen); ``residual_add`` (H = F +
Linear(P), zero-initialised, P the same pixel branch); ``concat`` (H = Linear([F, P]) initialised
to [I | 0]). All four start exactly at F, so the ablation compares the fusion operator, not its init.

Release-layout switches (the official inference release, as read for ``convert/pae.py``): the release's
compressor/decompressor is ONE bare attention layer (no norm, residual or MLP; ``compressor_arch:
attention``, ``compressor_qkv_bias``), its DAM has no LayerNorm before the SFT projection
(``dam_final_norm: false``), its SFT LayerNorm has an affine and eps 1e-5 (``sft_norm_affine: true``,
computed literally as LN(F(1+gamma)+beta), so at init it equals F only up to LN's eps), and its DAM
reads the image resized (bicubic) to the VFM input size in VFM-sized patches (``dam_input_size``).
The defaults (transformer blocks, DAM final norm, affine-free exact fusion, DAM patching the image
itself) are the trainable variant described above; the release's ViT-MAE decoder (CLS token, own
LayerNorm eps, separate q/k/v) is ``decoder_arch: mae`` with ``decoder_mlp_ratio``/``decoder_ln_eps``.

Losses (:class:`PAECriterion`), weights as the paper reports them (lpips 1.0, gan 0.5, ssr 0.2,
mcr 0.5, scr 1.0):

* reconstruction: L1 + perceptual (+ adaptive GAN) through :class:`ReconstructionLoss`.
* SSR: ``mean_b ||G(z) - G(T)||_F^2 / N^2`` with G the N x N *cosine* Gram matrix of the tokens
  (each token L2-normalised). The cosine form is needed because z (C channels on the RMS sphere)
  and T (D VFM channels) live at incomparable scales; dividing by N^2 makes the weight independent of
  the grid size. T = F (``targets.mode: raw``) or ``structural_target(F, strength)`` (``refined``).
* MCR: each token's C-vector is rotated, within the plane spanned by itself and a random direction
  orthogonal to it, by ``mcr_medium_deg`` (z_m) and ``mcr_large_deg`` (z_l) -- the SAME direction, so
  z_l continues z_m's geodesic: angle(z_r, z_m) = 42.5, angle(z_r, z_l) = 85, angle(z_m, z_l) = 42.5
  degrees, every token staying on its RMS sphere (the rotation is per token because the RMS
  normalisation is per token). ``cascaded``: d(D(z_m), sg D(z_r)) + d(D(z_l), sg D(z_m));
  ``small``: d(D(z_m), sg D(z_r)); ``large``: d(D(z_l), sg D(z_r)); d = L1 + perceptual_weight * P.
  Gradients reach the encoder through z (the manifold is what is being regularised).
* SCR: ``(1 - cos(pool(z), pool(T))) + mean_i (1 - cos(z_i, t_i))``, pool = mean over tokens. In
  ``refined`` mode T = the frozen semantic projector's ``project(F)`` (C channels, trained in the
  earlier stage by :mod:`manifold_lab.tokenizers.pae_targets`). In ``raw`` mode there is no C-channel
  target, so, as VA-VAE does, a trainable 1x1 conv (no bias) maps z to D channels and is compared
  with the raw F (the conv is part of the tokenizer, saved with it, unused by encode/decode).

The semantic projector is a FROZEN submodule in the state dict (requires_grad False), so a saved
PAE carries the projector it was trained against; :meth:`PAE.set_semantic_projector` copies the
trained one in (called by the ``prepare`` stage, ``pae_targets.pae_prepare``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from manifold_lab.errors import ConfigError
from manifold_lab.nn.vit import ViTDecoder, sincos_pos_embed, to_grid, to_tokens
from manifold_lab.tokenizers.base import FixedGridTokenizer
from manifold_lab.tokenizers.losses import (ReconstructionLoss, TokenizerCriterion, batch_images,
                                            perceptual_distance)
from manifold_lab.tokenizers.pae_targets import SemanticProjector, TargetConfig, structural_target
from manifold_lab.tokenizers.registry import TokenizerSpec, register_tokenizer
from manifold_lab.train.gan import GANConfig

FUSIONS = ("dam", "finetune", "residual_add", "concat")
MCR_MODES = ("none", "small", "large", "cascaded")
FEATURE_NORMS = ("auto", "layernorm", "none")
COMPRESSOR_ARCHS = ("block", "attention")
DECODER_ARCHS = ("vit", "mae")
RMS_EPS = 1e-6  # as the RMSNorm of the GAE code PAE builds on (no affine)
LN_EPS = 1e-6


@dataclass
class PAEConfig:
    """Architecture, fusion/regulariser switches and loss weights; defaults = the CPU recipe
    (32x32 images, MobileNetV2 -> 8x8x96 VFM tokens, 8x8x8 latent)."""

    image_size: int = 32
    in_channels: int = 3
    # frozen VFM
    encoder: str = "mobilenet_v2"
    encoder_weights: str | None = None  # a local weights file; None = the default lookup
    encoder_input_size: int | None = None  # None = the encoder's default (mobilenet 128 -> 8x8, DINOv2 224 -> 16x16)
    final_norm_affine: bool = False  # timm ViTs only: PAE drops the final norm's affine
    feature_norm: str = "auto"  # auto | layernorm | none: LayerNorm (no affine) on the VFM tokens
    # fusion / DAM
    fusion: str = "dam"  # dam | finetune | residual_add | concat
    dam_width: int | None = None  # pixel-token width; None = the VFM width D
    dam_depth: int = 2
    dam_heads: int = 4
    mlp_ratio: float = 4.0
    dam_input_size: int | None = None  # None: DAM patches the image itself (patch = image/grid); else it
    #                                    reads the image resized (bicubic) to this size, as the release (224)
    dam_final_norm: bool = True  # LayerNorm after the last DAM block (the release has none)
    sft_norm_affine: bool = False  # True: the release's literal LN_affine(F(1+gamma)+beta), eps 1e-5
    # compressor / decompressor (attention at the VFM width D)
    compressor_arch: str = "block"  # block: pre-norm transformer blocks; attention: one bare attention (release)
    compressor_qkv_bias: bool = True
    compressor_depth: int = 1
    decompressor_depth: int = 1
    block_heads: int = 4
    z_channels: int = 8
    # ViT decoder
    decoder_arch: str = "vit"  # vit: manifold_lab.nn.ViTDecoder; mae: the release's ViT-MAE decoder (CLS token)
    decoder_width: int = 128
    decoder_depth: int = 4
    decoder_heads: int = 4
    decoder_mlp_ratio: float | None = None  # None = mlp_ratio
    decoder_ln_eps: float = 1e-6  # decoder_arch mae only (the release: 1e-12)
    # reconstruction
    l1_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_name: str = "auto"
    gan: GANConfig = field(default_factory=GANConfig)
    # regularisers (0 = off)
    ssr_weight: float = 0.2
    mcr_weight: float = 0.5
    scr_weight: float = 1.0
    mcr_mode: str = "cascaded"  # none | small | large | cascaded
    mcr_medium_deg: float = 42.5
    mcr_large_deg: float = 85.0
    targets: TargetConfig = field(default_factory=TargetConfig)

    def __post_init__(self) -> None:
        for key in ("image_size", "in_channels", "z_channels", "dam_heads", "block_heads", "decoder_width",
                    "decoder_depth", "decoder_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"pae: {key} must be positive, got {getattr(self, key)}")
        for key in ("dam_depth", "compressor_depth", "decompressor_depth"):
            if getattr(self, key) < 0:
                raise ConfigError(f"pae: {key} must be >= 0, got {getattr(self, key)}")
        if self.dam_width is not None and self.dam_width <= 0:
            raise ConfigError(f"pae: dam_width must be positive or null (= VFM width), got {self.dam_width}")
        if self.encoder_input_size is not None and self.encoder_input_size <= 0:
            raise ConfigError(f"pae: encoder_input_size must be positive or null, got {self.encoder_input_size}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"pae: fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.mcr_mode not in MCR_MODES:
            raise ConfigError(f"pae: mcr_mode must be one of {', '.join(MCR_MODES)}, got {self.mcr_mode!r}")
        if self.decoder_arch not in DECODER_ARCHS:
            raise ConfigError(f"pae: decoder_arch must be one of {', '.join(DECODER_ARCHS)}, got {self.decoder_arch!r}")
        if (self.decoder_mlp_ratio is not None and self.decoder_mlp_ratio <= 0) or not self.decoder_ln_eps > 0:
            raise ConfigError("pae: decoder_mlp_ratio must be > 0 (or null) and decoder_ln_eps > 0")
        if self.compressor_arch not in COMPRESSOR_ARCHS:
            raise ConfigError(f"pae: compressor_arch must be one of {', '.join(COMPRESSOR_ARCHS)}, "
                              f"got {self.compressor_arch!r}")
        if self.dam_input_size is not None and self.dam_input_size <= 0:
            raise ConfigError(f"pae: dam_input_size must be positive or null, got {self.dam_input_size}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"pae: feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {self.feature_norm!r}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"pae: mlp_ratio must be > 0, got {self.mlp_ratio}")
        for key in ("l1_weight", "perceptual_weight", "ssr_weight", "mcr_weight", "scr_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"pae: {key} must be >= 0 (0 switches it off), got {getattr(self, key)}")
        if not 0.0 < self.mcr_medium_deg < 180.0 or not 0.0 < self.mcr_large_deg < 180.0:
            raise ConfigError("pae: mcr_medium_deg and mcr_large_deg must be angles in (0, 180) degrees")
        if self.mcr_mode == "cascaded" and self.mcr_large_deg <= self.mcr_medium_deg:
            raise ConfigError(f"pae: cascaded MCR needs mcr_large_deg > mcr_medium_deg, got "
                              f"{self.mcr_large_deg} <= {self.mcr_medium_deg}")
        if self.z_channels < 2 and self.mcr_weight > 0 and self.mcr_mode != "none":
            raise ConfigError("pae: MCR rotates each token on its RMS sphere and needs z_channels >= 2")

    @property
    def mcr_enabled(self) -> bool:
        return self.mcr_weight > 0 and self.mcr_mode != "none"


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
def rms_normalize(z: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """Per-token RMS normalisation without affine over the channel dim of (B,C,h,w): each token's
    C-vector is scaled to RMS 1 (computed in float32, returned in the input dtype)."""
    zf = z.float()
    return (zf * torch.rsqrt(zf.pow(2).mean(dim=1, keepdim=True) + eps)).to(z.dtype)


def _layer_norm_tokens(t: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the last dim."""
    return F.layer_norm(t, (t.shape[-1],), eps=LN_EPS)


class CrossAttention(nn.Module):
    """Multi-head attention with queries from ``x`` (B,N,dim) and keys/values from ``ctx`` (B,M,ctx_dim)."""

    def __init__(self, dim: int, ctx_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"pae: DAM width {dim} is not divisible by dam_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(ctx_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        m, h = ctx.shape[1], self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(ctx).view(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DAMBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the VFM tokens, MLP (each residual)."""

    def __init__(self, dim: int, ctx_dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_ctx = nn.LayerNorm(ctx_dim, eps=LN_EPS)
        self.cross = CrossAttention(dim, ctx_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm2(x), self.norm_ctx(ctx))
        return x + self.mlp(self.norm3(x))


class PixelBranch(nn.Module):
    """DAM's detail path: pixel patch tokens on the VFM's grid, sin-cos positions, DAM blocks, LN."""

    def __init__(self, in_channels: int, patch: int, grid: tuple[int, int], width: int, ctx_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float, input_size: int | None = None,
                 final_norm: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        if width % num_heads:
            raise ConfigError(f"pae: DAM width {width} is not divisible by dam_heads {num_heads}")
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.register_buffer("pos_embed", sincos_pos_embed(grid, width).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(DAMBlock(width, ctx_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS) if final_norm else nn.Identity()

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        tokens = to_tokens(self.patch_embed(x)) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            tokens = block(tokens, ctx)
        return self.norm(tokens)


class NormalizedVFM(nn.Module):
    """The frozen VFM as PAE sees it: its patch tokens followed (when ``layer_norm``) by a LayerNorm
    without affine. Held with ``attach_frozen("vfm", ...)``, so ``model.frozen("vfm")(x)`` -- what the
    target stage trains the projector on -- is exactly :meth:`PAE.frozen_features`. Immutable: a deep
    copy (an EMA model) shares it, like the encoder inside."""

    def __init__(self, encoder: nn.Module, layer_norm: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.layer_norm = bool(layer_norm)
        self.name = encoder.name
        self.embed_dim = int(encoder.embed_dim)
        self.grid_size = tuple(encoder.grid_size)
        self.input_size = encoder.input_size

    def __deepcopy__(self, memo: dict) -> "NormalizedVFM":
        return self

    def train(self, mode: bool = True) -> "NormalizedVFM":
        return super().train(False)

    def identity(self) -> str:
        return self.encoder.identity() + ("|tokens-layernorm" if self.layer_norm else "")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.encoder(images)
        if not self.layer_norm:
            return f
        return F.layer_norm(f.permute(0, 2, 3, 1), (f.shape[1],), eps=LN_EPS).permute(0, 3, 1, 2).contiguous()


class TrainableVFM(nn.Module):
    """A trainable copy of a frozen encoder's network (the ``finetune`` ablation): same preprocessing
    and token grid, parameters trainable and in the state dict. BatchNorm layers of a CNN stay in
    eval mode (frozen running statistics), the usual way to fine-tune a BN backbone on small batches."""

    def __init__(self, frozen: nn.Module) -> None:
        super().__init__()
        from manifold_lab.encoders import MobileNetV2Encoder, TimmViTEncoder

        self.name = frozen.name
        self.input_size = frozen.input_size
        self.grid_size = frozen.grid_size
        self.embed_dim = frozen.embed_dim
        self.register_buffer("pixel_mean", frozen.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", frozen.pixel_std.clone(), persistent=False)
        if isinstance(frozen, MobileNetV2Encoder):
            self.kind = "cnn"
            self.features = frozen.features
        elif isinstance(frozen, TimmViTEncoder):
            self.kind = "vit"
            self.model = frozen.model
            self.num_prefix_tokens = frozen.num_prefix_tokens
        else:
            raise ConfigError(f"pae: fusion 'finetune' does not support encoder {frozen.name}")
        for p in self.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> "TrainableVFM":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from manifold_lab.encoders import FrozenEncoder, TimmViTEncoder

        x = FrozenEncoder.preprocess(self, images)
        if self.kind == "cnn":
            return self.features(x)
        return TimmViTEncoder.encode_normalized(self, x)


class MAEBlock(nn.Module):
    """HF ViT-MAE decoder layer: pre-LN attention with separate q/k/v, pre-LN GELU MLP, both residual."""

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, ln_eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width, eps=ln_eps)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=ln_eps)
        self.fc1 = nn.Linear(width, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).view(b, n, self.num_heads, w // self.num_heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class MAEDecoder(nn.Module):
    """The release's decoder (RAE's HF ViT-MAE decoder): linear embed, a trainable CLS token prepended,
    a fixed position table (persistent, so a converted release keeps its own), MAE layers, LayerNorm,
    linear pixel head; the CLS output is dropped and the patches unpatchified."""

    def __init__(self, in_channels: int, grid: tuple[int, int], patch: int, width: int = 256, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, out_channels: int = 3, ln_eps: float = 1e-12) -> None:
        super().__init__()
        if width % num_heads:
            raise ConfigError(f"pae: decoder width {width} is not divisible by decoder_heads {num_heads}")
        self.grid, self.patch, self.out_channels = (int(grid[0]), int(grid[1])), int(patch), int(out_channels)
        self.embed = nn.Linear(in_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        table = torch.cat([torch.zeros(1, width), sincos_pos_embed(self.grid, width)]).unsqueeze(0)
        self.register_buffer("pos_embed", table)
        self.blocks = nn.ModuleList(MAEBlock(width, num_heads, int(width * mlp_ratio), ln_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        self.head = nn.Linear(width, patch * patch * out_channels)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from manifold_lab.nn.vit import unpatchify

        t = self.embed(to_tokens(z))
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1) + self.pos_embed.to(t.dtype)
        for block in self.blocks:
            t = block(t)
        return unpatchify(self.head(self.norm(t))[:, 1:], self.grid, self.patch, self.out_channels)

    def last_layer(self) -> nn.Parameter:
        return self.head.weight


# ----------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------
class PAE(FixedGridTokenizer):
    """Prior-Aligned AutoEncoder: frozen VFM + DAM -> compressor -> RMS-normalised latent -> decoder."""

    name = "pae"
    grid_note = "fixed VFM grid and ViT decoder"

    def __init__(self, config: PAEConfig | None = None) -> None:
        from manifold_lab.encoders import TimmViTEncoder

        cfg = config if config is not None else PAEConfig()
        vfm = self._build_vfm(cfg)
        grid = tuple(int(g) for g in vfm.grid_size)
        patch = self.grid_patch("pae", cfg.image_size, grid, what=f"the VFM grid ({cfg.encoder})")
        super().__init__(cfg, cfg.image_size, cfg.in_channels, cfg.z_channels, downsample=patch)
        self.grid, self.patch = grid, patch
        d = int(vfm.embed_dim)
        self.vfm_dim = d
        if cfg.feature_norm == "auto":
            self._norm_features = not (isinstance(vfm, TimmViTEncoder) and not vfm.final_norm_affine)
        else:
            self._norm_features = cfg.feature_norm == "layernorm"
        self.attach_frozen("vfm", NormalizedVFM(vfm, self._norm_features))
        for what, heads in (("block_heads", cfg.block_heads), ("decoder_heads", cfg.decoder_heads)):
            width = d if what == "block_heads" else cfg.decoder_width
            if width % heads:
                raise ConfigError(f"pae: width {width} is not divisible by {what} {heads}")

        # fusion
        width = cfg.dam_width or d
        if cfg.fusion == "finetune":
            self.vfm_trainable = TrainableVFM(self._build_vfm(cfg))
        else:
            dam_patch = patch
            if cfg.dam_input_size is not None:
                if cfg.dam_input_size % grid[0]:
                    raise ConfigError(f"pae: dam_input_size {cfg.dam_input_size} is not a multiple of the VFM grid "
                                      f"{grid[0]}x{grid[1]}")
                dam_patch = cfg.dam_input_size // grid[0]
            self.pixel = PixelBranch(cfg.in_channels, dam_patch, grid, width, d, cfg.dam_depth, cfg.dam_heads,
                                     cfg.mlp_ratio, cfg.dam_input_size, cfg.dam_final_norm)
            if cfg.fusion == "dam":
                self.sft = nn.Linear(width, 2 * d)
                if cfg.sft_norm_affine:
                    self.sft_norm = nn.LayerNorm(d, eps=1e-5)
            elif cfg.fusion == "residual_add":
                self.fuse = nn.Linear(width, d)
            else:  # concat
                self.fuse = nn.Linear(d + width, d)
        # compressor / decompressor / decoder
        self.compressor = nn.ModuleList(self._attention_layer(cfg, d) for _ in range(cfg.compressor_depth))
        self.to_latent = nn.Conv2d(d, cfg.z_channels, 3, padding=1)
        self.from_latent = nn.Conv2d(cfg.z_channels, d, 3, padding=1)
        self.decompressor = nn.ModuleList(self._attention_layer(cfg, d) for _ in range(cfg.decompressor_depth))
        dec_mlp = cfg.decoder_mlp_ratio if cfg.decoder_mlp_ratio is not None else cfg.mlp_ratio
        dec_cls = MAEDecoder if cfg.decoder_arch == "mae" else ViTDecoder
        extra = {"ln_eps": cfg.decoder_ln_eps} if cfg.decoder_arch == "mae" else {}
        self.decoder = dec_cls(d, grid, patch, width=cfg.decoder_width, depth=cfg.decoder_depth,
                               num_heads=cfg.decoder_heads, mlp_ratio=dec_mlp, out_channels=cfg.in_channels, **extra)
        # targets
        if cfg.targets.mode == "refined":
            self.sem_projector = _build_projector(d, cfg.z_channels, cfg.targets)
            self.sem_projector.requires_grad_(False)
        if cfg.targets.mode == "raw" and cfg.scr_weight > 0:
            self.scr_head = nn.Conv2d(cfg.z_channels, d, 1, bias=False)
        self._init_weights()

    @staticmethod
    def _attention_layer(cfg: PAEConfig, d: int) -> nn.Module:
        """A (de)compressor layer: a pre-norm transformer block, or (``compressor_arch: attention``, the
        release's layout) one bare attention layer without norm, residual or MLP."""
        if cfg.compressor_arch == "attention":
            return Attention(d, num_heads=cfg.block_heads, qkv_bias=cfg.compressor_qkv_bias)
        return Block(d, cfg.block_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.compressor_qkv_bias)

    @staticmethod
    def _build_vfm(cfg: PAEConfig) -> nn.Module:
        from manifold_lab.encoders import TIMM_VITS, build_encoder

        kw: dict[str, Any] = {}
        if cfg.encoder_input_size is not None:
            kw["input_size"] = cfg.encoder_input_size
        if cfg.encoder in TIMM_VITS:
            kw["final_norm_affine"] = cfg.final_norm_affine
        return build_encoder(cfg.encoder, weights=cfg.encoder_weights, **kw)

    def _init_weights(self) -> None:
        # MAE/timm style: xavier-uniform linears with zero biases (the decoder initialises itself).
        for name, module in self.named_modules():
            if name.startswith(("decoder", "vfm_trainable", "sem_projector")):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if hasattr(self, "pixel"):
            w = self.pixel.patch_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.pixel.patch_embed.bias)
        with torch.no_grad():
            if hasattr(self, "sft"):  # zero-initialised SFT: gamma = beta = 0, H starts at F
                self.sft.weight.zero_()
                self.sft.bias.zero_()
            if self.config.fusion == "residual_add":
                self.fuse.weight.zero_()
                self.fuse.bias.zero_()
            if self.config.fusion == "concat":  # [I | 0]: starts at F as well
                self.fuse.weight.zero_()
                self.fuse.weight[:, :self.vfm_dim].copy_(torch.eye(self.vfm_dim))
                self.fuse.bias.zero_()

    # ----- resolution: the VFM input and the decoder grid are fixed ----------------------------
    def last_layer(self) -> nn.Parameter:
        return self.decoder.last_layer()

    # ----- features --------------------------------------------------------------------------
    def _normalize_features(self, f: torch.Tensor) -> torch.Tensor:
        if not self._norm_features:
            return f
        return to_grid(_layer_norm_tokens(to_tokens(f)), self.grid)

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen VFM tokens F (B,D,h,w) -- after the final LayerNorm without affine -- the targets'
        source and the DAM's starting point. No gradient."""
        return self.frozen("vfm")(x).float()

    def fused_tokens(self, x: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """The fusion output H (B, h*w, D) that the compressor reads (the "DAM path")."""
        if self.config.fusion == "finetune":
            return to_tokens(self._normalize_features(self.vfm_trainable(x)))
        f = to_tokens(self.frozen_features(x) if feats is None else feats).to(x.dtype)
        p = self.pixel(x, f)
        if self.config.fusion == "dam":
            gamma, beta = self.sft(p).chunk(2, dim=-1)
            if self.config.sft_norm_affine:  # the release's literal form (LN(F) ~ F only up to eps at init)
                return self.sft_norm(f * (1 + gamma) + beta)
            # = LN(F(1+gamma)+beta) up to LN's eps (F is already LN'ed); bit-exactly F when gamma=beta=0
            return f + (_layer_norm_tokens(f * (1 + gamma) + beta) - _layer_norm_tokens(f))
        if self.config.fusion == "residual_add":
            return f + self.fuse(p)
        return self.fuse(torch.cat([f, p], dim=-1))

    def _compress(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.compressor:
            h = block(h)
        return rms_normalize(self.to_latent(to_grid(h, self.grid)))

    def _encode(self, x: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        return self._compress(self.fused_tokens(x, feats))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h = to_tokens(self.from_latent(z))
        for block in self.decompressor:
            h = block(h)
        return self.decoder(to_grid(h, self.grid))

    # ----- MCR ---------------------------------------------------------------------------------
    def rotate(self, z: torch.Tensor, degrees: float | list[float],
               direction: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each token's C-vector of ``z`` (B,C,h,w) rotated by each angle in ``degrees`` towards ONE random
        direction orthogonal to it (the same for all angles, so the results lie on one geodesic); the
        norm is kept, so RMS-normalised tokens stay on their RMS sphere."""
        angles = [degrees] if isinstance(degrees, (int, float)) else list(degrees)
        zf = z.float()
        u = torch.randn_like(zf) if direction is None else direction.float()
        norm = zf.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unit = zf / norm
        u = u - (u * unit).sum(dim=1, keepdim=True) * unit
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out = []
        for deg in angles:
            theta = math.radians(float(deg))
            out.append((math.cos(theta) * zf + math.sin(theta) * norm * u).to(z.dtype))
        return out

    # ----- training forward --------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """Everything the criterion needs, computed inside the (DDP-visible) forward:
        ``recon``, ``z``, ``feats`` (frozen F), ``mcr`` (list of (D(z_pert), target) pairs; targets
        detached), ``scr_proj`` (raw-mode SCR projection of z, or None)."""
        self.check_images(x)
        cfg: PAEConfig = self.config
        feats = self.frozen_features(x)
        z = self._encode(x, feats if cfg.fusion != "finetune" else None)
        recon = self._decode(z)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if cfg.mcr_enabled:
            anchor = recon.detach()
            if cfg.mcr_mode == "small":
                (z_m,) = self.rotate(z, [cfg.mcr_medium_deg])
                pairs.append((self._decode(z_m), anchor))
            elif cfg.mcr_mode == "large":
                (z_l,) = self.rotate(z, [cfg.mcr_large_deg])
                pairs.append((self._decode(z_l), anchor))
            else:
                z_m, z_l = self.rotate(z, [cfg.mcr_medium_deg, cfg.mcr_large_deg])
                # one decoder pass for both perturbations
                both = self._decode(torch.cat([z_m, z_l]))
                x_m, x_l = both.chunk(2)
                pairs += [(x_m, anchor), (x_l, x_m.detach())]
        scr_proj = self.scr_head(z) if hasattr(self, "scr_head") else None
        return {"recon": recon, "z": z, "feats": feats, "mcr": pairs, "scr_proj": scr_proj}

    @torch.no_grad()
    def reference_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The maps the latent is aligned to (:class:`~manifold_lab.tokenizers.base.HasReferenceMaps`):
        the frozen VFM features F and, with refined targets, SSR's low-passed structural target."""
        self.check_images(x)
        feats = self.frozen_features(x)
        maps = {"vfm_features": feats}
        if self.config.targets.mode == "refined":
            maps["ssr_target"] = self.structural_target(feats)
        return maps

    # ----- refined targets -------------------------------------------------------------------
    def set_semantic_projector(self, projector: nn.Module) -> None:
        """Copy a trained semantic projector's weights into the frozen ``sem_projector`` (refined mode)."""
        if not hasattr(self, "sem_projector"):
            raise ConfigError("pae: set_semantic_projector needs targets.mode 'refined' (raw mode has no projector)")
        self.sem_projector.load_state_dict(projector.state_dict(), strict=True)
        self.sem_projector.requires_grad_(False)

    def semantic_target(self, feats: torch.Tensor) -> torch.Tensor:
        """T_sem (B,C,h,w): the frozen projector's C-channel projection of F (refined mode)."""
        with torch.no_grad():
            return self.sem_projector.project(feats.float())

    def structural_target(self, feats: torch.Tensor) -> torch.Tensor:
        """T_struct: F itself (raw) or the low-pass refined structural target (refined)."""
        if self.config.targets.mode != "refined":
            return feats
        with torch.no_grad():
            return structural_target(feats.float(), self.config.targets.lowpass_strength,
                                     self.config.targets.upsample)


def _build_projector(in_dim: int, out_dim: int, targets: TargetConfig) -> nn.Module:
    return SemanticProjector(in_dim, out_dim, targets.projector_hidden)


# ----------------------------------------------------------------------------------------------
# regularisers
# ----------------------------------------------------------------------------------------------
def cosine_gram(t: torch.Tensor) -> torch.Tensor:
    """(B,K,h,w) -> (B,N,N) cosine Gram matrix of the N = h*w tokens (each L2-normalised)."""
    tok = F.normalize(t.float().flatten(2).transpose(1, 2), dim=-1, eps=1e-8)
    return tok @ tok.transpose(1, 2)


def ssr_loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSR: mean over the batch of ||G(z) - G(T)||_F^2 / N^2 (cosine Gram matrices; 0 iff they agree)."""
    diff = cosine_gram(z) - cosine_gram(target.detach())
    return diff.pow(2).mean(dim=(1, 2)).mean()


def scr_loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SCR: (1 - cos(pool(z), pool(T))) + mean over tokens (1 - cos(z_i, t_i)), averaged over the batch."""
    zf, tf = z.float(), target.detach().float()
    global_term = 1 - F.cosine_similarity(zf.mean(dim=(2, 3)), tf.mean(dim=(2, 3)), dim=1, eps=1e-8)
    token_term = (1 - F.cosine_similarity(zf, tf, dim=1, eps=1e-8)).flatten(1).mean(1)
    return (global_term + token_term).mean()


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token angle (degrees) between the C-vectors of two (B,C,h,w) latents."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=1).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


class PAECriterion(TokenizerCriterion):
    """Reconstruction (+GAN) + ssr_weight*SSR + mcr_weight*MCR + scr_weight*SCR (see module docstring)."""

    def __init__(self, config: PAEConfig) -> None:
        super().__init__(ReconstructionLoss(config.l1_weight, config.perceptual_weight, config.perceptual_name,
                                            gan=config.gan))
        self.config = config

    def _distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = (pred.float() - target.float()).abs().mean()
        if self.config.perceptual_weight > 0:
            p = perceptual_distance(self.config.perceptual_name, pred.device)(pred, target).float().mean()
            d = d + self.config.perceptual_weight * p
        return d

    def forward(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from manifold_lab.train import unwrap_model

        cfg = self.config
        core: PAE = unwrap_model(model)
        x = batch_images(batch)
        out = model(x)
        loss, logs = self.recon(x, out["recon"], step, last_layer=core.last_layer())
        logs = dict(logs)
        z, feats = out["z"], out["feats"]
        if cfg.ssr_weight > 0:
            ssr = ssr_loss(z, core.structural_target(feats))
            loss = loss + cfg.ssr_weight * ssr
            logs["ssr"] = ssr.detach()
        if cfg.mcr_enabled:
            mcr = sum(self._distance(pred, target) for pred, target in out["mcr"])
            loss = loss + cfg.mcr_weight * mcr
            logs["mcr"] = mcr.detach()
        if cfg.scr_weight > 0:
            if cfg.targets.mode == "refined":
                scr = scr_loss(z, core.semantic_target(feats))
            else:
                scr = scr_loss(out["scr_proj"], feats)
            loss = loss + cfg.scr_weight * scr
            logs["scr"] = scr.detach()
        return loss, logs


def _prepare(model: Any, recipe: Any, dataset: Any, run_dir: Any, progress: bool) -> None:
    """TokenizerSpec.prepare: the refined-target stage (projector training) when targets.mode is refined."""
    if model.config.targets.mode != "refined":
        return None
    from manifold_lab.tokenizers.pae_targets import pae_prepare

    return pae_prepare(model, recipe, dataset, run_dir, progress)


_RECIPES = Path(__file__).resolve().parent / "recipes"

PAE_SPEC = register_tokenizer(TokenizerSpec(
    name="pae",
    config_cls=PAEConfig,
    build=PAE,
    criterion=PAECriterion,
    prepare=_prepare,
    default_recipe=_RECIPES / "pae_cpu.yaml",
    paper_recipe=_RECIPES / "pae_imagenet256.yaml",
    description="Prior-Aligned AutoEncoder: frozen VFM + DAM, RMS-normalised latent, SSR/MCR/SCR regularisers",
))
