"""RAE, the Representation Autoencoder (Zheng et al. 2025): a frozen VFM is the encoder, only a ViT
decoder is trained, and the latent is the VFM's patch tokens under per-element normalisation.

Written from the paper and a reading of the reference code (github.com/bytetriper/RAE:
``src/stage1/rae.py``, ``src/stage1/decoders/decoder.py``, ``src/calculate_stat.py``,
``src/train_stage1.py``, ``configs/stage1/*``); no code is copied.

Encoder
    The frozen VFM held with :meth:`TokenizerBase.attach_frozen` (outside the state dict). Paper:
    ``dinov2_vitb14_reg`` at 224 px with the final LayerNorm WITHOUT its affine part
    (``final_norm_affine=False``; RAE's ``Dinov2withNorm``), CLS and register tokens dropped:
    768 x 16 x 16. CPU default: ``mobilenet_v2`` (96 x 8 x 8 for a 32 px image).

Latent normalisation (per element, exactly as RAE's stats file holds it)
    ``encode(x) = (f(x) - mean) / sqrt(var + eps)`` with ``mean``/``var`` of shape (D, h, w): one
    value per (channel, position) element, ``eps = 1e-5`` (RAE stores the VARIANCE and adds eps
    inside the square root). RAE estimates them with a BatchNorm-like momentum update
    (``calculate_stat.py``: not exact, depends on batch order); here they are EXACT: float64 sums over
    ``norm_stats_images`` training images (all when None), population variance. They are computed by
    the spec's ``prepare`` hook before training (saved atomically to ``run_dir`` and reused on
    resume) and live in PERSISTENT buffers (``latent_mean``, ``latent_var``, ``latent_stats_images``),
    so they travel with the weights. Until they exist (``latent_stats_images == 0``) the normaliser
    is the identity. ``decode(z)`` undoes the normalisation and runs the decoder.
    These are separate from TokenizerBase's per-channel ``latent_stats`` (computed after training on
    ``encode()`` output, for the diffusion model).

Noise-augmented decoder training
    During training the decoder sees ``f(x) + sigma * eps`` with ``sigma ~ U(0, tau)`` drawn ONCE
    PER SAMPLE and ``eps ~ N(0, I)`` per element, tau = 0.8 (``RAE.noising``). As in RAE the noise is
    added to the RAW VFM tokens (before per-element normalisation; RAE's stage-1 training config
    even has the stats file commented out): for DINOv2 without the final affine each token is
    LayerNorm'd, so tau is relative to unit-variance tokens. In normalised units the noise on
    element e is therefore ``sigma / sqrt(var_e + eps)``. No noise in eval mode, in ``encode``, or in
    ``decode``: ``forward(x)`` adds it only when ``self.training``.

Decoder
    ``decoder_arch: vit`` -- :class:`manifold_lab.nn.ViTDecoder` (MAE-decoder style, sin-cos
    positions, timm blocks), predicting [-1, 1] pixels. ``decoder_arch: mae`` -- a variant faithful
    to RAE's released decoder (an HF ``ViTMAE`` decoder, ``GeneralDecoder``): a trainable CLS token
    prepended to the tokens, a fixed sin-cos position table with a zero CLS row (MAE's coordinate
    order), separate q/k/v projections, exact (erf) GELU, LayerNorm eps 1e-12 in RAE's configs, and
    pixels predicted in the encoder's normalised space (``pixel_output: encoder``: x = out * std +
    mean in [0, 1], mapped to [-1, 1]). The RAE converter (``convert/rae.py``) targets this variant.
    Paper: ViT-XL decoder (width 1152, 28 layers, 16 heads, MLP 4096), patch 16 on the 16x16 grid.

Loss
    ``l1_weight * |x - x_rec| + perceptual_weight * LPIPS (+ adaptive GAN)`` through
    :class:`ReconstructionLoss`. RAE computes its L1 on [0, 1] pixels (ours is on [-1, 1]: twice
    as large for the same error) with LPIPS weight 1.0 and a DINO-based discriminator (weight 0.75,
    from epoch 8 of 16, adaptive weight capped at 1e4); the discriminator here is the shared PatchGAN.

DiT-side facts (for the diffusion issue; nothing here uses them)
    RAE trains its DiT on these wide latents with a dimension-dependent time shift
    ``s = sqrt(h * w * C / 4096)`` (``time_dist_shift_dim = 16*16*768``, base 4096: s = sqrt(48))
    applied as ``t' = s t / (1 + (s - 1) t)``, and the DiT-DH model: a DiT-XL body (1152 wide,
    28 blocks) with a wide, shallow "DDT" head (2048 wide, 2 blocks), patch 1 on the 16x16 grid.
    :meth:`RAE.shift_dim` / :meth:`RAE.time_shift` give ``h*w*C`` and ``s`` for this tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from manifold_lab.errors import ConfigError, ManifoldLabError
from manifold_lab.nn import ViTDecoder, to_tokens, unpatchify
from manifold_lab.tokenizers.base import FixedGridTokenizer
from manifold_lab.tokenizers.losses import ReconstructionCriterion, batch_images
from manifold_lab.tokenizers.registry import TokenizerSpec, register_tokenizer
from manifold_lab.train.gan import GANConfig

RECIPES = Path(__file__).resolve().parent / "recipes"
STATS_FILE = "rae_latent_stats.safetensors"


@dataclass
class RAEConfig:
    """Architecture and loss weights; the defaults are the CPU recipe (32x32 -> 96x8x8 MobileNetV2 tokens)."""

    image_size: int = 32
    in_channels: int = 3
    encoder: str = "mobilenet_v2"
    encoder_weights: str | None = None  # a local weights file; None = the default lookup
    encoder_input_size: int | None = None  # None: the encoder's own (mobilenet 128, DINOv2 224)
    final_norm_affine: bool = False  # timm ViT encoders only: RAE drops the final LayerNorm's affine
    decoder_arch: Literal["vit", "mae"] = "vit"
    pixel_output: Literal["direct", "encoder"] = "direct"  # "encoder": RAE's out * std + mean
    decoder_width: int = 128
    decoder_depth: int = 4
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    decoder_ln_eps: float = 1e-6  # "mae" decoder only (RAE's configs: 1e-12)
    noise_tau: float = 0.8
    stats_eps: float = 1e-5
    norm_stats_images: int | None = 10_000  # images for the per-element stats; None = all
    norm_stats_batch_size: int = 256
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_name: str = "auto"
    gan: GANConfig = field(default_factory=GANConfig)

    def __post_init__(self) -> None:
        for key in ("image_size", "decoder_width", "decoder_depth", "decoder_heads", "norm_stats_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"rae: {key} must be positive, got {getattr(self, key)}")
        if self.in_channels != 3:
            raise ConfigError(f"rae: in_channels must be 3 (the frozen encoder takes RGB), got {self.in_channels}")
        if self.decoder_arch not in ("vit", "mae"):
            raise ConfigError(f"rae: decoder_arch must be 'vit' or 'mae', got {self.decoder_arch!r}")
        if self.pixel_output not in ("direct", "encoder"):
            raise ConfigError(f"rae: pixel_output must be 'direct' or 'encoder', got {self.pixel_output!r}")
        if self.decoder_width % self.decoder_heads:
            raise ConfigError(f"rae: decoder_width {self.decoder_width} is not divisible by decoder_heads "
                              f"{self.decoder_heads}")
        if self.decoder_arch == "mae" and self.decoder_width % 4:
            raise ConfigError(f"rae: the 'mae' decoder's 2-D sin-cos table needs decoder_width divisible by 4, "
                              f"got {self.decoder_width}")
        if self.decoder_mlp_ratio <= 0 or self.decoder_ln_eps <= 0:
            raise ConfigError("rae: decoder_mlp_ratio and decoder_ln_eps must be > 0")
        if not 0.0 <= self.noise_tau:
            raise ConfigError(f"rae: noise_tau must be >= 0 (0 disables the noise), got {self.noise_tau}")
        if self.stats_eps <= 0:
            raise ConfigError(f"rae: stats_eps must be > 0, got {self.stats_eps}")
        if self.norm_stats_images is not None and self.norm_stats_images < 1:
            raise ConfigError(f"rae: norm_stats_images must be >= 1 or null (all images), got {self.norm_stats_images}")
        if self.l1_weight < 0 or self.perceptual_weight < 0:
            raise ConfigError("rae: l1_weight and perceptual_weight must be >= 0")
        if self.encoder_input_size is not None and self.encoder_input_size <= 0:
            raise ConfigError(f"rae: encoder_input_size must be positive or null, got {self.encoder_input_size}")


def build_frozen_encoder(name: str, weights: str | None, input_size: int | None, final_norm_affine: bool):
    """The frozen VFM a config names (keywords only where the encoder takes them)."""
    from manifold_lab.encoders import TIMM_VITS, build_encoder

    kw: dict[str, Any] = {}
    if input_size is not None:
        kw["input_size"] = int(input_size)
    if name in TIMM_VITS:
        kw["final_norm_affine"] = bool(final_norm_affine)
    return build_encoder(name, weights=weights, **kw)


# ----- the decoder variant faithful to RAE's released (HF ViT-MAE style) decoder ---------------------
def mae_sincos_table(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table with a zero CLS row: (1 + grid*grid, dim), float32.

    MAE builds ``meshgrid(w, h)`` so the FIRST half of the channels encodes the column (w) index and
    the second half the row index; each half is [sin(pos * omega), cos(pos * omega)] with
    ``omega_i = 10000 ** (-i / (dim/4))``. Computed in float64 like MAE's numpy code.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid): row index, column index

    def one_d(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    table = torch.cat([one_d(cols, dim // 2), one_d(rows, dim // 2)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0).float()


class MAEDecoderBlock(nn.Module):
    """HF ViT-MAE layer: LN -> attention (separate q, k, v) -> residual; LN -> MLP (erf GELU) -> residual."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class MAEStyleDecoder(nn.Module):
    """RAE's ``GeneralDecoder``: tokens (B, D, h, w) -> patch pixels, with a trainable CLS token."""

    def __init__(self, in_channels: int, grid: tuple[int, int], patch: int, width: int, depth: int, heads: int,
                 mlp_dim: int, eps: float, out_channels: int = 3) -> None:
        super().__init__()
        if grid[0] != grid[1]:
            raise ConfigError(f"rae: the 'mae' decoder needs a square token grid, got {grid}")
        self.grid, self.patch, self.out_channels = (int(grid[0]), int(grid[1])), int(patch), int(out_channels)
        self.embed = nn.Linear(in_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # persistent like RAE's frozen ``decoder_pos_embed`` parameter: converted checkpoints carry it
        self.register_buffer("pos_embed", mae_sincos_table(width, self.grid[0]).unsqueeze(0))
        self.blocks = nn.ModuleList(MAEDecoderBlock(width, heads, mlp_dim, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.head = nn.Linear(width, patch * patch * out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(to_tokens(z))
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm(x))[:, 1:]
        return unpatchify(out, self.grid, self.patch, self.out_channels)

    def last_layer(self) -> nn.Parameter:
        return self.head.weight


# ----- the tokenizer ---------------------------------------------------------------------------------
class RAE(FixedGridTokenizer):
    """Frozen VFM tokens, per-element normalised, decoded by a trained ViT."""

    name = "rae"
    grid_note = "the decoder's fixed patch grid"

    def __init__(self, config: RAEConfig | None = None) -> None:
        config = config if config is not None else RAEConfig()
        enc = build_frozen_encoder(config.encoder, config.encoder_weights, config.encoder_input_size,
                                   config.final_norm_affine)
        gh, gw = enc.grid_size
        patch = self.grid_patch("rae", config.image_size, (gh, gw))
        super().__init__(config, config.image_size, config.in_channels, enc.embed_dim, downsample=patch)
        self.attach_frozen("encoder", enc)
        self.grid = (gh, gw)
        self.patch = patch
        mlp_dim = int(round(config.decoder_width * config.decoder_mlp_ratio))
        if config.decoder_arch == "vit":
            self.decoder: nn.Module = ViTDecoder(enc.embed_dim, self.grid, patch, width=config.decoder_width,
                                                 depth=config.decoder_depth, num_heads=config.decoder_heads,
                                                 mlp_ratio=config.decoder_mlp_ratio)
        else:
            self.decoder = MAEStyleDecoder(enc.embed_dim, self.grid, patch, config.decoder_width,
                                           config.decoder_depth, config.decoder_heads, mlp_dim,
                                           config.decoder_ln_eps)
        shape = (enc.embed_dim, gh, gw)
        # per-element statistics (persistent: they travel with the weights); count 0 = identity
        self.register_buffer("latent_mean", torch.zeros(shape))
        self.register_buffer("latent_var", torch.ones(shape))
        self.register_buffer("latent_stats_images", torch.zeros((), dtype=torch.long))

    # ----- per-element normalisation ---------------------------------------------------------------
    @property
    def has_element_stats(self) -> bool:
        return int(self.latent_stats_images) > 0

    def set_element_stats(self, mean: torch.Tensor, var: torch.Tensor, num_images: int) -> None:
        """Install per-element mean/var of shape (D, h, w) computed on ``num_images`` images."""
        shape = tuple(self.latent_mean.shape)
        if tuple(mean.shape) != shape or tuple(var.shape) != shape:
            raise ManifoldLabError(f"rae: per-element stats must have shape {shape}, got mean "
                                   f"{tuple(mean.shape)} and var {tuple(var.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
            raise ManifoldLabError("rae: per-element stats must be finite with var >= 0")
        if num_images < 1:
            raise ManifoldLabError(f"rae: per-element stats need num_images >= 1, got {num_images}")
        with torch.no_grad():
            self.latent_mean.copy_(mean.to(self.latent_mean))
            self.latent_var.copy_(var.to(self.latent_var))
            self.latent_stats_images.fill_(int(num_images))

    def _element_affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) with identity values until stats exist; no host sync (torch.where)."""
        ready = self.latent_stats_images > 0
        mean = torch.where(ready, self.latent_mean, torch.zeros_like(self.latent_mean))
        scale = torch.where(ready, torch.sqrt(self.latent_var + self.config.stats_eps),
                            torch.ones_like(self.latent_var))
        return mean.to(dtype).unsqueeze(0), scale.to(dtype).unsqueeze(0)

    def normalize_elements(self, raw: torch.Tensor) -> torch.Tensor:
        mean, scale = self._element_affine(raw.dtype)
        return (raw - mean) / scale

    def denormalize_elements(self, z: torch.Tensor) -> torch.Tensor:
        mean, scale = self._element_affine(z.dtype)
        return z * scale + mean

    # ----- encode / decode ---------------------------------------------------------------------------
    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw frozen-VFM tokens (B, D, h, w), no gradient to the encoder."""
        return self.frozen("encoder")(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize_elements(self.encoder_features(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(self.denormalize_elements(z))

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) VFM tokens -> images in [-1, 1]."""
        out = self.decoder(raw)
        if self.config.pixel_output == "encoder":  # RAE: pixels in the encoder's normalised space
            enc = self.frozen("encoder")
            out = (out * enc.pixel_std.to(out.dtype) + enc.pixel_mean.to(out.dtype)) * 2.0 - 1.0
        return out

    def add_noise(self, raw: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``raw + sigma * eps`` with ``sigma ~ U(0, tau)`` per sample; returns (noisy, sigma [B])."""
        b = raw.shape[0]
        sigma = self.config.noise_tau * torch.rand(b, generator=generator, device=raw.device, dtype=torch.float32)
        eps = torch.randn(raw.shape, generator=generator, device=raw.device, dtype=raw.dtype)
        return raw + sigma.to(raw.dtype).view(b, *([1] * (raw.ndim - 1))) * eps, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward: reconstruction of ``x``; decoder input noised only in training mode."""
        self.check_images(x)
        raw = self.encoder_features(x)
        if self.training and self.config.noise_tau > 0:
            raw, _ = self.add_noise(raw)
        return self.decode_raw(raw)

    def last_layer(self) -> nn.Parameter:
        return self.decoder.last_layer()

    # ----- DiT-side helpers --------------------------------------------------------------------------
    def shift_dim(self) -> int:
        """h * w * C of the latent (RAE's ``time_dist_shift_dim``)."""
        c, h, w = self.latent_shape
        return c * h * w

    def time_shift(self, base: int = 4096) -> float:
        """RAE's dimension-dependent time shift ``sqrt(h*w*C / base)``."""
        return math.sqrt(self.shift_dim() / base)


#: L1 + LPIPS (+ adaptive GAN) on the reconstruction of noise-augmented latents (the noise is in RAE.forward).
RAECriterion = ReconstructionCriterion


# ----- the per-element statistics stage (runs before training) --------------------------------------
@torch.no_grad()
def compute_element_stats(model: RAE, dataset: Dataset, num_images: int | None, batch_size: int = 256,
                          seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact per-element mean and population variance (float64 sums) of the raw VFM tokens over the
    first ``num_images`` images of a permutation seeded by ``seed`` (all images when None).

    Under DDP each process encodes its own share (every world-size-th image) and the float64 sums are
    all-reduced, so every process ends with the same statistics of the same image set.
    """
    from manifold_lab import distributed

    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    if n < 1:
        raise ManifoldLabError("rae: per-element statistics need at least one image; the dataset is empty")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    order = order[distributed.rank()::distributed.world_size()]
    loader = DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False)
    device = model.latent_mean.device
    shape = tuple(model.latent_mean.shape)
    total = torch.zeros(shape, dtype=torch.float64, device=device)
    sq = torch.zeros(shape, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    bar = None
    if progress and distributed.is_main_process():
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="rae per-element latent stats", unit="img")
        except ImportError:  # pragma: no cover
            bar = None
    for batch in loader:
        x = batch_images(batch).to(device)
        f = model.encoder_features(x).double()
        total += f.sum(0)
        sq += f.pow(2).sum(0)
        count += f.shape[0]
        if bar is not None:
            bar.update(f.shape[0])
    if bar is not None:
        bar.close()
    total, sq, count = (distributed.all_reduce_sum(t) for t in (total, sq, count))
    mean = total / count
    var = (sq / count - mean.pow(2)).clamp_min(0.0)
    return mean.float().cpu(), var.float().cpu(), int(count.item())


def prepare_rae(model: RAE, recipe: Any, dataset: Dataset, run_dir: str | Path, progress: bool = True) -> None:
    """Spec ``prepare`` hook: per-element stats, computed once per run dir (atomic file) and reused.

    Runs on the recipe's training device (all processes share the work under ``torchrun``); the file
    records the encoder identity, image count, seed and dataset, and is recomputed if any differs.
    """
    from manifold_lab import distributed
    from manifold_lab.io import load_tensors, save_tensors
    from manifold_lab.train import resolve_device

    cfg: RAEConfig = model.config
    path = Path(run_dir) / STATS_FILE
    train_cfg = getattr(recipe, "train", None)
    seed = int(getattr(train_cfg, "seed", 0))
    identity = model.frozen("encoder").identity()
    n_wanted = len(dataset) if cfg.norm_stats_images is None else min(int(cfg.norm_stats_images), len(dataset))
    meta = {"encoder": identity, "images": str(n_wanted), "seed": str(seed),
            "dataset": f"{getattr(dataset, 'name', type(dataset).__name__)}:{getattr(dataset, 'split', '')}"}
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            stored = fh.metadata() or {}
        if {k: stored.get(k) for k in meta} == meta:
            t = load_tensors(path)
            model.set_element_stats(t["mean"], t["var"], int(stored["images"]))
            return
    distributed.init_from_env()  # idempotent; the engine would do it next anyway
    if train_cfg is not None:
        model.to(resolve_device(getattr(train_cfg, "device", "auto")))
    mean, var, count = compute_element_stats(model, dataset, cfg.norm_stats_images, cfg.norm_stats_batch_size,
                                             seed=seed, progress=progress)
    if distributed.is_main_process():
        save_tensors(path, {"mean": mean, "var": var}, metadata=meta)
    model.set_element_stats(mean, var, count)


RAE_SPEC = register_tokenizer(TokenizerSpec(
    name="rae",
    config_cls=RAEConfig,
    build=RAE,
    criterion=RAECriterion,
    prepare=prepare_rae,
    default_recipe=RECIPES / "rae_cpu.yaml",
    paper_recipe=RECIPES / "rae_imagenet256.yaml",
    description="Representation Autoencoder: frozen VFM tokens (per-element normalised) + noise-augmented ViT decoder",
))
