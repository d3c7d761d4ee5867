"""Unified Latents (UL; Heek, Hoogeboom, Mensink, Salimans, arXiv 2602.17270): a latent whose
information content is priced by a diffusion prior and which is decoded by a diffusion model.

Why it is in the zoo: UL is the tokenizer whose bitrate is an explicit, trainable quantity. Its three
parts are trained jointly (stage 1, this module); the base diffusion model on frozen latents (stage 2)
is the LightningDiT trainer's job.

Encoder (deterministic): the VAE's convolutional ResNet encoder (imported from
:mod:`manifold_lab.tokenizers.vae`) with its output conv narrowed to ``z_channels`` (no variance head)
-> ``z_clean`` (B, C, H/f, W/f). The latent the rest of the model sees is the fixed-noise
``z_0 = alpha_0 z_clean + sigma_0 eps`` at log-SNR ``lambda(0) = latent_log_snr = 5`` (variance
preserving: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so sigma_0 ~ 0.082).
:meth:`encode` returns ``z_clean`` -- deterministic, as the Tokenizer protocol requires; ``z_0`` is
what the decoder and the prior see during training, and :meth:`decode` maps ``z`` to ``alpha_0 * z``
(the noise-free ``z_0``) before conditioning on it.

Prior: a small transformer (timm blocks over the h*w latent tokens, sin-cos positions, a log-SNR
embedding added to every token) that predicts v on ``z_t = alpha_t z_clean + sigma_t eps``, for a VP
diffusion whose t = 0 end is exactly the encoder's noise level (``prior_schedule`` from
``latent_log_snr`` at t = 0 down to ``prior_lambda_min`` at t = 1). Its loss is the UNWEIGHTED
continuous-time ELBO (see :mod:`manifold_lab.tokenizers.ul_diffusion`)::

    prior_nats = KL(q(z_1|z_clean) || N(0,I)) + E_t[ -dlambda/dt * exp(lambda) / 2 * ||z_clean - z_hat||^2 ]

Because the prior's first noise level equals the encoder's, this is an upper bound on
``KL(q(z_0|x) || p(z_0)) = -log p(z_0) - H(z_0|x)``: the number of nats the latent carries (the rate).
Its gradients flow into the encoder, so it regularises how much information the latent holds.
Reported as **bits per pixel**: ``bpp = prior_nats / (ln 2 * H * W)``, with H*W the number of image
pixels (an RGB pixel counts once; ``bpd = bpp / 3`` per sub-pixel is logged too).

Decoder: a pixel-space diffusion model (a conv UNet with FiLM log-SNR conditioning and attention at
the bottleneck) on ``x_t = alpha_t x + sigma_t eps``, conditioned on ``z_0`` (upsampled to the image
and concatenated with ``x_t``, and added again at the bottleneck). It predicts v. Its loss is the
sigmoid-weighted ELBO (Kingma & Gao 2023; as in SiD2 by the same group)::

    decoder_nats = E_t[ -dlambda/dt / 2 * sigmoid(b - lambda) * ||eps - eps_hat||^2 ]      (b = sigmoid_bias)

Stage-1 objective per image, divided by the number of sub-pixels 3*H*W so both terms keep the same
units (nats) and the loss factor means what it means in the paper::

    loss = loss_factor * decoder_nats + prior_nats        (loss_factor 1.3 - 1.7 in the paper)

(``prior_warmup_steps`` > 0 ramps the prior term in linearly: not in the paper, see :class:`ULCriterion`.)

A larger loss factor makes reconstruction more valuable relative to the latent's bits: more bits,
better PSNR; a smaller one gives cheaper, easier-to-model latents.

Decoding is reverse diffusion: a deterministic DDIM sampler over ``decode_steps`` uniform steps in t
of the decoder's schedule, starting from noise drawn with a fixed seed (``decode_seed``), with the
predicted clean image clipped to [-1, 1] at each step. ``decode`` is therefore a deterministic function
of ``z`` (for a given batch layout), which LPC and PSNR need.

Choices not fixed by what we could read of the paper (no public code exists; documented guesses):
cosine log-SNR schedules for both diffusions (prior: lambda in [-10, 5]; decoder: [-15, 15] with an
optional SiD-style resolution shift), v-prediction, ``sigmoid_bias`` (0 by default; SiD2 prescribes
-3 at its base resolution), the architectures and their widths. Optional extras that are not UL's:
``l1_weight``/``perceptual_weight``/``gan`` act on the decoder's one-step prediction x_hat (0 by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab.errors import ConfigError
from manifold_lab.nn.vit import TokenBlocks, sincos_pos_embed, to_grid, to_tokens
from manifold_lab.tokenizers.base import TokenizerBase
from manifold_lab.tokenizers.losses import ReconstructionLoss, TokenizerCriterion, batch_images
from manifold_lab.tokenizers.registry import TokenizerSpec, register_tokenizer
from manifold_lab.tokenizers.ul_diffusion import (SCHEDULES, LogSNRSchedule, alpha_sigma, expand,
                                                  low_discrepancy_times, prior_elbo_weight, sigmoid_elbo_weight,
                                                  terminal_kl, v_to_x)
from manifold_lab.tokenizers.vae import AttnBlock, Downsample, Encoder, Upsample, VAEConfig, _norm
from manifold_lab.train.gan import GANConfig

_RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass
class ULConfig:
    """Architecture, diffusion settings and loss weights; defaults are the CPU recipe (32x32 -> 4x8x8)."""

    image_size: int = 32
    in_channels: int = 3
    z_channels: int = 4
    # encoder (the VAE's conv encoder, deterministic head)
    base_channels: int = 16
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    mid_attention: bool = True
    norm_groups: int = 8
    # fixed encoder noise = the prior's lowest noise level
    latent_log_snr: float = 5.0
    # prior: transformer over latent tokens, unweighted ELBO
    prior_width: int = 64
    prior_depth: int = 2
    prior_heads: int = 4
    prior_mlp_ratio: float = 4.0
    prior_schedule: str = "cosine"
    prior_lambda_min: float = -10.0
    # decoder: pixel-space conv UNet, sigmoid-weighted ELBO
    dec_patch: int = 2  # pixel-unshuffle factor before the UNet (SiD2-style patching; 1 = none)
    dec_base_channels: int = 32
    dec_ch_mult: tuple[int, ...] = (1, 2)
    dec_num_res_blocks: int = 1
    dec_attention: bool = True
    dec_schedule: str = "cosine"
    dec_lambda_min: float = -15.0
    dec_lambda_max: float = 15.0
    dec_shift: float = 0.0
    sigmoid_bias: float = 0.0
    loss_factor: float = 1.5
    prior_warmup_steps: int = 0  # ramp the prior term 0 -> 1 over these optimizer steps (0 = paper: none)
    # decoding (reverse diffusion) and the bits-per-pixel estimate
    decode_steps: int = 16
    decode_seed: int = 0
    clip_denoised: bool = True
    bpp_t_samples: int = 16
    # optional terms on the decoder's one-step prediction (not in the paper; 0 = off)
    l1_weight: float = 0.0
    perceptual_weight: float = 0.0
    perceptual_name: str = "auto"
    gan: GANConfig = field(default_factory=GANConfig)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.dec_ch_mult = tuple(int(m) for m in self.dec_ch_mult)
        for key in ("ch_mult", "dec_ch_mult"):
            value = getattr(self, key)
            if not value or any(m <= 0 for m in value):
                raise ConfigError(f"ul: {key} must be a non-empty list of positive integers, got {list(value)}")
        for key in ("image_size", "in_channels", "z_channels", "base_channels", "num_res_blocks", "norm_groups",
                    "prior_width", "prior_depth", "prior_heads", "dec_patch", "dec_base_channels", "dec_num_res_blocks",
                    "decode_steps", "bpp_t_samples"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"ul: {key} must be positive, got {getattr(self, key)}")
        if self.prior_width % self.prior_heads or self.prior_width % 4:
            raise ConfigError(f"ul: prior_width ({self.prior_width}) must be divisible by prior_heads "
                              f"({self.prior_heads}) and by 4")
        for key in ("prior_schedule", "dec_schedule"):
            if getattr(self, key) not in SCHEDULES:
                raise ConfigError(f"ul: {key} must be one of {', '.join(SCHEDULES)}, got {getattr(self, key)!r}")
        if not self.prior_lambda_min < self.latent_log_snr:
            raise ConfigError(f"ul: prior_lambda_min ({self.prior_lambda_min}) must be below latent_log_snr "
                              f"({self.latent_log_snr})")
        if not self.dec_lambda_min < self.dec_lambda_max:
            raise ConfigError(f"ul: dec_lambda_min ({self.dec_lambda_min}) must be below dec_lambda_max "
                              f"({self.dec_lambda_max})")
        if not self.loss_factor > 0:
            raise ConfigError(f"ul: loss_factor must be > 0 (paper: 1.3 to 1.7), got {self.loss_factor}")
        if self.prior_warmup_steps < 0:
            raise ConfigError(f"ul: prior_warmup_steps must be >= 0, got {self.prior_warmup_steps}")
        if self.prior_mlp_ratio <= 0:
            raise ConfigError(f"ul: prior_mlp_ratio must be > 0, got {self.prior_mlp_ratio}")
        if self.l1_weight < 0 or self.perceptual_weight < 0:
            raise ConfigError("ul: l1_weight and perceptual_weight must be >= 0")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def dec_downsample(self) -> int:
        """Factor between the image and the decoder UNet's bottleneck (patching included)."""
        return self.dec_patch * 2 ** (len(self.dec_ch_mult) - 1)


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
class LogSNREmbedding(nn.Module):
    """log-SNR -> conditioning vector: sin/cos features at geometric frequencies, then an MLP."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(0.02), math.log(10.0), half)),
                             persistent=False)
        out_dim = out_dim or dim
        self.mlp = nn.Sequential(nn.Linear(2 * half, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        arg = lam.float()[:, None] * self.freqs[None]
        feats = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LatentPrior(nn.Module):
    """v-prediction transformer over the latent tokens: (z_t, lambda) -> v_hat, same shape as z_t."""

    def __init__(self, cfg: ULConfig) -> None:
        super().__init__()
        d = cfg.prior_width
        self.width = d
        self.embed = nn.Linear(cfg.z_channels, d)
        self.time = LogSNREmbedding(d)
        self.blocks = TokenBlocks(d, cfg.prior_depth, cfg.prior_heads, cfg.prior_mlp_ratio)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.z_channels)
        nn.init.zeros_(self.head.weight)  # v_hat = 0 at init: x_hat = alpha * z_t
        nn.init.zeros_(self.head.bias)

    def forward(self, z_t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        grid = (int(z_t.shape[-2]), int(z_t.shape[-1]))
        pos = sincos_pos_embed(grid, self.width).to(z_t.device, z_t.dtype)
        tokens = self.embed(to_tokens(z_t)) + pos.unsqueeze(0) + self.time(lam).unsqueeze(1).to(z_t.dtype)
        return to_grid(self.head(self.norm(self.blocks(tokens))), grid)


class TimeResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with FiLM conditioning (scale, shift from the log-SNR embedding)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class PixelDecoder(nn.Module):
    """Conditional denoiser in pixel space: (x_t, z_0, lambda) -> v_hat (B, 3, H, W).

    ``x_t`` is pixel-unshuffled by ``dec_patch`` (p x p pixels -> 3p^2 channels), then a UNet (one stage
    per ``dec_ch_mult`` entry, skip connections per block, attention at the bottleneck); ``z_0`` is
    upsampled (nearest) to the patch grid and concatenated with the input, and a conv of it is added
    again at the bottleneck. The output is pixel-shuffled back to (B, 3, H, W).
    """

    def __init__(self, cfg: ULConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.dec_base_channels * m for m in cfg.dec_ch_mult]
        emb_dim = 4 * cfg.dec_base_channels
        self.patch = cfg.dec_patch
        pix = cfg.in_channels * cfg.dec_patch ** 2
        self.time = LogSNREmbedding(cfg.dec_base_channels, emb_dim)
        self.conv_in = nn.Conv2d(pix + cfg.z_channels, cfg.dec_base_channels, 3, padding=1)
        ch = cfg.dec_base_channels
        skips = [ch]
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(cfg.dec_num_res_blocks):
                stage.blocks.append(TimeResBlock(ch, width, emb_dim, g))
                ch = width
                skips.append(ch)
            stage.down = Downsample(ch) if i < len(widths) - 1 else nn.Identity()
            if i < len(widths) - 1:
                skips.append(ch)
            self.down.append(stage)
        self.z_proj = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid1 = TimeResBlock(ch, ch, emb_dim, g)
        self.mid_attn = AttnBlock(ch, g) if cfg.dec_attention else nn.Identity()
        self.mid2 = TimeResBlock(ch, ch, emb_dim, g)
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(cfg.dec_num_res_blocks + 1):
                stage.blocks.append(TimeResBlock(ch + skips.pop(), width, emb_dim, g))
                ch = width
            stage.up = Upsample(ch) if i > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, pix, 3, padding=1)

    def forward(self, x_t: torch.Tensor, z0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        emb = self.time(lam)
        x_in = F.pixel_unshuffle(x_t, self.patch) if self.patch > 1 else x_t
        cond = F.interpolate(z0, size=x_in.shape[-2:], mode="nearest").to(x_t.dtype)
        h = self.conv_in(torch.cat([x_in, cond], dim=1))
        hs = [h]
        for stage in self.down:
            for block in stage.blocks:
                h = block(h, emb)
                hs.append(h)
            if not isinstance(stage.down, nn.Identity):
                h = stage.down(h)
                hs.append(h)
        z_mid = z0 if tuple(z0.shape[-2:]) == tuple(h.shape[-2:]) else F.interpolate(z0, size=h.shape[-2:], mode="nearest")
        h = h + self.z_proj(z_mid.to(h.dtype))
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for stage in self.up:
            for block in stage.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = stage.up(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out


# --------------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------------
class UnifiedLatents(TokenizerBase):
    """UL stage-1 model: deterministic encoder + latent diffusion prior + pixel diffusion decoder."""

    name = "ul"

    def __init__(self, config: ULConfig | None = None) -> None:
        config = config if config is not None else ULConfig()
        super().__init__(config, config.image_size, config.in_channels, config.z_channels,
                         downsample=config.downsample)
        enc_cfg = VAEConfig(image_size=config.image_size, in_channels=config.in_channels,
                            base_channels=config.base_channels, ch_mult=config.ch_mult,
                            num_res_blocks=config.num_res_blocks, mid_attention=config.mid_attention,
                            z_channels=config.z_channels, norm_groups=config.norm_groups)
        self.encoder = Encoder(enc_cfg)
        # deterministic head: z_channels outputs instead of the VAE's mean and log-variance
        self.encoder.conv_out = nn.Conv2d(self.encoder.conv_out.in_channels, config.z_channels, 3, padding=1)
        self.prior = LatentPrior(config)
        self.decoder = PixelDecoder(config)
        self.prior_schedule = LogSNRSchedule(config.prior_schedule, config.prior_lambda_min, config.latent_log_snr)
        self.dec_schedule = LogSNRSchedule(config.dec_schedule, config.dec_lambda_min, config.dec_lambda_max,
                                           shift=config.dec_shift)
        lam0 = torch.tensor(float(config.latent_log_snr), dtype=torch.float64)
        self.alpha0 = float(torch.sigmoid(lam0).sqrt())
        self.sigma0 = float(torch.sigmoid(-lam0).sqrt())

    # ----- resolution ---------------------------------------------------------------------------
    def supports_resolution(self, size: int) -> bool:
        f = max(self.config.downsample, self.config.dec_downsample)
        return int(size) >= 8 and int(size) % self.config.downsample == 0 and int(size) % f == 0

    def resolution_rule(self) -> str:
        f = max(self.config.downsample, self.config.dec_downsample)
        return f"H and W multiples of {f} and >= 8"

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight

    # ----- encode / decode ----------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def noisy_latent(self, z_clean: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z_0 = alpha_0 z_clean + sigma_0 eps at log-SNR ``latent_log_snr`` (noise=None draws eps)."""
        noise = torch.randn_like(z_clean) if noise is None else noise
        return self.alpha0 * z_clean + self.sigma0 * noise

    def _decode(self, z: torch.Tensor, steps: int | None = None, seed: int | None = None) -> torch.Tensor:
        return self.sample(self.alpha0 * z, steps=steps, seed=seed)

    def decode(self, z: torch.Tensor, steps: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Raw latents (``encode``'s z_clean) -> images by reverse diffusion (``steps``: default
        ``decode_steps``; ``seed``: default ``decode_seed``). Deterministic for a given z batch."""
        self.check_latents(z)
        return self._decode(z, steps=steps, seed=seed)

    def sample(self, z0: torch.Tensor, steps: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Deterministic DDIM from t = 1 to t = 0 of the decoder schedule, conditioned on ``z0``."""
        cfg = self.config
        steps = int(cfg.decode_steps if steps is None else steps)
        seed = int(cfg.decode_seed if seed is None else seed)
        b, f = z0.shape[0], self.downsample
        shape = (b, cfg.in_channels, z0.shape[-2] * f, z0.shape[-1] * f)
        gen = torch.Generator(device=z0.device).manual_seed(seed)
        x = torch.randn(shape, generator=gen, device=z0.device, dtype=torch.float32)
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        lams = self.dec_schedule.lam(ts).float()
        x_hat = x
        for i in range(steps):
            lam_t, lam_s = lams[i], lams[i + 1]
            a_t, s_t = alpha_sigma(lam_t)
            a_s, s_s = alpha_sigma(lam_s)
            v_hat = self.decoder(x.to(z0.dtype), z0, lam_t.expand(b).to(z0.device)).float()
            x_hat = v_to_x(x, v_hat, a_t, s_t)
            if cfg.clip_denoised:
                x_hat = x_hat.clamp(-1.0, 1.0)
            eps_hat = (x - a_t * x_hat) / s_t
            x = a_s * x_hat + s_s * eps_hat
        return x_hat.to(z0.dtype)

    # ----- losses ---------------------------------------------------------------------------------
    def prior_nats(self, z_clean: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One-sample estimate of the prior's unweighted ELBO (terminal KL + diffusion term), nats [B]."""
        sched = self.prior_schedule
        t = t.to(z_clean.device, torch.float32)
        lam = sched.lam(t)
        a, s = alpha_sigma(lam)
        a, s = expand(a, z_clean), expand(s, z_clean)
        noise = torch.randn_like(z_clean) if noise is None else noise
        z_t = a * z_clean + s * noise
        v_hat = self.prior(z_t, lam).float()
        z_hat = v_to_x(z_t.float(), v_hat, a, s)
        mse = (z_clean.float() - z_hat).pow(2).flatten(1).sum(1)
        return prior_elbo_weight(sched, t) * mse + terminal_kl(sched, z_clean)

    def decoder_nats(self, x: torch.Tensor, z0: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmoid-weighted ELBO estimate in nats [B], one-step prediction x_hat)."""
        sched = self.dec_schedule
        t = t.to(x.device, torch.float32)
        lam = sched.lam(t)
        a, s = alpha_sigma(lam)
        a, s = expand(a, x), expand(s, x)
        noise = torch.randn_like(x) if noise is None else noise
        x_t = a * x + s * noise
        v_hat = self.decoder(x_t.to(x.dtype), z0, lam).float()
        x_hat = v_to_x(x_t.float(), v_hat, a, s)
        mse = (x.float() - x_hat).pow(2).flatten(1).sum(1)
        return sigmoid_elbo_weight(sched, t, self.config.sigmoid_bias) * mse, x_hat

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stage-1 training pass: every trainable part is used (DDP sees them all).

        Returns ``prior_nats`` [B], ``decoder_nats`` [B] (sigmoid-weighted), ``x_hat`` (one-step decoder
        prediction at the sampled noise level) and ``z_clean``.
        """
        self.check_images(x)
        z_clean = self.encoder(x)
        b = x.shape[0]
        t_prior = low_discrepancy_times(b, x.device)
        t_dec = low_discrepancy_times(b, x.device)
        prior = self.prior_nats(z_clean, t_prior)
        z0 = self.noisy_latent(z_clean)
        dec, x_hat = self.decoder_nats(x, z0, t_dec)
        return {"prior_nats": prior, "decoder_nats": dec, "x_hat": x_hat, "z_clean": z_clean}

    @torch.no_grad()
    def prior_bound(self, x: torch.Tensor, t_samples: int | None = None, seed: int = 0) -> torch.Tensor:
        """Prior ELBO (upper bound on the latent's nats) per image [B]: stratified t, fixed seed."""
        self.check_images(x)
        n = int(self.config.bpp_t_samples if t_samples is None else t_samples)
        z_clean = self.encoder(x).float()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
        for k in range(n):
            u = torch.rand((x.shape[0],), generator=gen, dtype=torch.float64)
            t = ((k + u) / n).to(x.device)
            noise = torch.randn(z_clean.shape, generator=gen).to(x.device)
            total += self.prior_nats(z_clean, t.float(), noise).double()
        return (total / n).float()

    def bits_per_pixel(self, x: torch.Tensor, t_samples: int | None = None, seed: int = 0) -> torch.Tensor:
        """Upper bound on the latent's information in bits per image pixel [B] (H*W pixels, RGB counted once)."""
        h, w = x.shape[-2:]
        return self.prior_bound(x, t_samples, seed) / (math.log(2.0) * h * w)


# --------------------------------------------------------------------------------------------------
# criterion
# --------------------------------------------------------------------------------------------------
class ULCriterion(TokenizerCriterion):
    """``loss = loss_factor * decoder_nats + ramp(step) * prior_nats``, per image, divided by 3*H*W.

    ``ramp`` is 1 (the paper) unless ``prior_warmup_steps > 0``: a linear KL-annealing style warm-up, a
    CPU-budget deviation -- in short runs the prior otherwise wins before the decoder has learned to
    use z, and the latent collapses to ~0 bits (measured: 0.035 bpp and a decoder that ignores z after
    300 steps).

    Logs: ``prior`` and ``decoder`` (nats per sub-pixel), ``bpp`` (bits per pixel, one-sample estimate),
    ``bpd`` (bits per sub-pixel) and, when any optional term is on, the reconstruction terms on x_hat.
    """

    def __init__(self, config: ULConfig) -> None:
        super().__init__(ReconstructionLoss(config.l1_weight, config.perceptual_weight, config.perceptual_name,
                                            config.gan))
        self.config = config
        self._extra = config.l1_weight > 0 or config.perceptual_weight > 0 or config.gan.enabled

    def prior_ramp(self, step: int) -> float:
        """Weight of the prior term at ``step``: linear 0 -> 1 over ``prior_warmup_steps`` (1 when 0)."""
        n = self.config.prior_warmup_steps
        return 1.0 if n <= 0 else min(1.0, (int(step) + 1) / n)

    def forward(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from manifold_lab.train import unwrap_model

        x = batch_images(batch)
        out = model(x)
        dims = x[0].numel()
        prior = out["prior_nats"].float().mean() / dims
        dec = out["decoder_nats"].float().mean() / dims
        ramp = self.prior_ramp(step)
        loss = self.config.loss_factor * dec + ramp * prior
        bpd = prior.detach() / math.log(2.0)
        logs = {"prior": prior.detach(), "decoder": dec.detach(), "bpp": bpd * x.shape[1], "bpd": bpd}
        if ramp < 1.0:
            logs["prior_ramp"] = torch.tensor(ramp)
        if self._extra:
            core = unwrap_model(model)
            rec, rec_logs = self.recon(x, out["x_hat"], step, last_layer=core.last_layer())
            loss = loss + rec
            logs.update(rec_logs)
        return loss, logs


def build_ul(config: ULConfig) -> UnifiedLatents:
    return UnifiedLatents(config)


UL_SPEC = register_tokenizer(TokenizerSpec(
    name="ul",
    config_cls=ULConfig,
    build=build_ul,
    criterion=ULCriterion,
    default_recipe=_RECIPES / "ul_cpu.yaml",
    paper_recipe=_RECIPES / "ul_imagenet256.yaml",
    description="Unified Latents: deterministic encoder with fixed-noise z_0 (log-SNR 5), diffusion prior "
                "(unweighted ELBO -> latent bits per pixel), pixel diffusion decoder (sigmoid weighting, loss factor)",
))

__all__ = ["ULConfig", "UnifiedLatents", "ULCriterion", "LatentPrior", "PixelDecoder", "UL_SPEC"]
