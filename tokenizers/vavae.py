"""VA-VAE (LightningDiT paper): the LDM KL autoencoder whose latent is aligned to a frozen VFM.

Why: a high-dimensional VAE latent (f16d32) reconstructs well but diffuses badly; aligning it to a
vision foundation model's tokens (the "VF loss") makes it as easy to model as a low-dimensional one.
Written from the paper and our reading of hustvl/LightningDiT (``vavae/ldm/models/autoencoder.py``,
``vavae/ldm/modules/losses/contperceptual.py``, ``vavae/ldm/models/foundation_models.py``,
``vavae/configs/f16d32_vfdinov2*.yaml``); no code is copied.

Model = :class:`~manifold_lab.tokenizers.vae.VAE` (same encoder/decoder/posterior) plus

* ``vf_proj``: a 1x1 convolution WITHOUT bias from the latent (``z_channels``) to the VFM width D
  (the reference's ``reverse_proj: true`` layout, the one of the released model). It is part of the
  state dict; the VFM itself is held with ``attach_frozen`` (never in checkpoints), built from
  ``encoder``/``encoder_weights`` on first use (encode/decode never need it, so a converted
  checkpoint can be measured without the VFM's weights on the machine).
* two LDM layout options the plain VAE lacks, needed to run the released weights exactly:
  ``attn_stages`` (single-head attention after every ResNet block of these resolution levels, LDM's
  ``attn_resolutions``; the released f16d32 model has it at the 16x16 level, index 4) and
  ``downsample_padding: ldm`` (pad right/bottom by one, stride-2 conv without padding, where the VAE
  pads symmetrically). With the defaults the body is exactly :class:`VAE`.

VF loss (reference ``LPIPSWithDiscriminator.forward``), with z the SAMPLED posterior latent (the
reference aligns the sample, not the mean), p = vf_proj(z) and f the VFM tokens of the same image,
both (B, D, h, w); f is resized to the latent grid when the grids differ (bilinear, antialiased when
shrinking; the reference never needs it, both grids are 16x16)::

    distmat = mean_{b,i,j} relu(|cos(p_i, p_j) - cos(f_i, f_j)| - m_dist)   # on the PROJECTED latent
    cos     = mean_{b,i}   relu(1 - m_cos - cos(f_i, p_i))
    vf      = distmat_weight * distmat + cos_weight * cos

Total: ``nll + kl_weight * KL/(3HW) + gan + w * vf`` with nll = L1 + perceptual_weight * P (the
reconstruction part, no GAN, no KL) and, when ``adaptive_vf``, ``w = vf_weight * clamp(||grad_W nll||
/ (||grad_W vf|| + 1e-4), 0, 1e8)`` detached, W = the ENCODER's last conv weight (``encoder.conv_out``);
otherwise ``w = vf_weight``. The reference's nll is a per-image sum (LDM) where ours is a per-pixel
mean: the adaptive weight is invariant to that scale, a fixed ``vf_weight`` is not (divide the
reference value by 3*H*W). Without autograd (evaluation) the adaptive weight is 0, as in the reference.

VFM input: by default the VFM gets its usual preprocessing (resize + ImageNet mean/std).
``vfm_imagenet_norm: false`` reproduces the reference, which feeds DINOv2-L the [-1, 1] images resized
to 224 (bilinear, no antialias) WITHOUT mean/std normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab.errors import ConfigError, ManifoldLabError
from manifold_lab.tokenizers.losses import (ReconstructionLoss, TokenizerCriterion, batch_images,
                                            perceptual_distance)
from manifold_lab.tokenizers.registry import TokenizerSpec, register_tokenizer
from manifold_lab.tokenizers.vae import (VAE, AttnBlock, Decoder, DiagonalGaussian, Downsample, Encoder,
                                         VAEConfig)
from manifold_lab.train.gan import GANConfig

#: Token width of the known frozen encoders (so the projection can be built without loading them).
KNOWN_VFM_DIMS = {
    "mobilenet_v2": 96, "dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024,
    "dinov2_vitb14_reg": 768, "dinov2_vitl14_reg": 1024, "dinov3_vits16plus": 384, "dinov3_vitb16": 768,
    "siglip2_vitb16": 768, "mae_vitb16": 768,
}
DOWNSAMPLE_PADDINGS = ("same", "ldm")
ADAPTIVE_EPS = 1e-4  # as the reference (and taming's GAN weight)
MAX_ADAPTIVE_VF = 1e8  # the reference's clamp


@dataclass
class VAVAEConfig(VAEConfig):
    """VAE fields + the VFM alignment. Defaults: the CPU recipe (32x32 -> 4x8x8, MobileNetV2 8x8x96)."""

    encoder: str | None = "mobilenet_v2"  # frozen VFM; None = no alignment (a plain LDM KL-VAE)
    encoder_weights: str | None = None  # local weights file; None = the default lookup
    vf_dim: int = 0  # VFM token width; 0 = known width of `encoder` (else the encoder is built to ask)
    vfm_imagenet_norm: bool = True  # False: feed the VFM un-normalised [-1,1] images, as the reference
    vf_weight: float = 0.1  # reference schedule 0.5 -> 0.1 -> 0.1 (see the imagenet recipe)
    adaptive_vf: bool = True
    m_dist: float = 0.25  # distance-matrix margin (reference `distmat_margin`)
    m_cos: float = 0.5  # marginal cosine margin (reference `cos_margin`)
    distmat_weight: float = 1.0
    cos_weight: float = 1.0
    attn_stages: tuple[int, ...] = ()  # resolution levels with attention after each ResNet block (LDM)
    downsample_padding: str = "same"  # "same" (VAE) | "ldm" (pad right/bottom, as the released weights)
    gan: GANConfig = field(default_factory=GANConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.gan, dict):
            self.gan = GANConfig(**self.gan)
        self.attn_stages = tuple(sorted({int(s) for s in self.attn_stages}))
        if any(not 0 <= s < len(self.ch_mult) for s in self.attn_stages):
            raise ConfigError(f"vavae: attn_stages must be level indices in [0, {len(self.ch_mult) - 1}], "
                              f"got {list(self.attn_stages)}")
        if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ConfigError(f"vavae: downsample_padding must be one of {', '.join(DOWNSAMPLE_PADDINGS)}, "
                              f"got {self.downsample_padding!r}")
        for key in ("vf_weight", "distmat_weight", "cos_weight", "vf_dim"):
            if getattr(self, key) < 0:
                raise ConfigError(f"vavae: {key} must be >= 0, got {getattr(self, key)}")
        for key in ("m_dist", "m_cos"):
            if not 0.0 <= getattr(self, key) <= 2.0:
                raise ConfigError(f"vavae: {key} must be in [0, 2] (cosine differences lie in [-2, 2]), "
                                  f"got {getattr(self, key)}")
        if self.encoder is None:
            if self.vf_weight > 0:
                raise ConfigError("vavae: encoder is null (no VFM alignment) but vf_weight > 0; "
                                  "set vf_weight: 0 or name an encoder")
        elif not isinstance(self.encoder, str) or not self.encoder:
            raise ConfigError(f"vavae: encoder must be an encoder name or null, got {self.encoder!r}")


# ---------------------------------------------------------------------------- LDM layout options
class LDMDownsample(Downsample):
    """LDM's stride-2 conv: zero-pad one row/column at the bottom/right, then convolve without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class LDMEncoder(Encoder):
    """:class:`Encoder` with per-level attention (``stages.{i}.attn.{j}``) and LDM downsampling."""

    def __init__(self, cfg: VAVAEConfig) -> None:
        super().__init__(cfg)
        for i, stage in enumerate(self.stages):
            width = cfg.base_channels * cfg.ch_mult[i]
            stage.attn = nn.ModuleList(
                [AttnBlock(width, cfg.norm_groups) for _ in stage.blocks] if i in cfg.attn_stages else [])
            if cfg.downsample_padding == "ldm" and isinstance(stage.down, Downsample):
                stage.down = LDMDownsample(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.stages:
            for j, block in enumerate(stage.blocks):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            h = stage.down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMDecoder(Decoder):
    """:class:`Decoder` with per-level attention; decoder stage k is resolution level L-1-k."""

    def __init__(self, cfg: VAVAEConfig) -> None:
        super().__init__(cfg)
        levels = len(cfg.ch_mult)
        for k, stage in enumerate(self.stages):
            level = levels - 1 - k
            width = cfg.base_channels * cfg.ch_mult[level]
            stage.attn = nn.ModuleList(
                [AttnBlock(width, cfg.norm_groups) for _ in stage.blocks] if level in cfg.attn_stages else [])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.stages:
            for j, block in enumerate(stage.blocks):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            h = stage.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------- the VF loss
def resize_grid(feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """VFM token grid (B, D, H, W) -> (B, D, *size): bilinear, antialiased when shrinking."""
    if tuple(feats.shape[-2:]) == tuple(size):
        return feats
    shrink = size[0] < feats.shape[-2] or size[1] < feats.shape[-1]
    return F.interpolate(feats, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def vf_loss_terms(z_proj: torch.Tensor, feats: torch.Tensor, m_dist: float, m_cos: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance-matrix margin term, marginal cosine term) between p = vf_proj(z) and f, both (B, D, h, w).

    distmat = mean_{b,i,j} relu(|cos(p_i, p_j) - cos(f_i, f_j)| - m_dist);
    cos = mean_{b,i} relu(1 - m_cos - cos(f_i, p_i)). Computed in float32.
    """
    if z_proj.shape != feats.shape:
        raise ManifoldLabError(f"vf loss: projected latent {tuple(z_proj.shape)} and VFM features "
                               f"{tuple(feats.shape)} must have the same shape")
    p, f = z_proj.float(), feats.float()
    pn = F.normalize(p.flatten(2), dim=1)  # (B, D, N), unit tokens
    fn = F.normalize(f.flatten(2), dim=1)
    gram_p = pn.transpose(1, 2) @ pn  # (B, N, N) token-pair cosines
    gram_f = fn.transpose(1, 2) @ fn
    distmat = F.relu((gram_p - gram_f).abs() - m_dist).mean()
    cos = F.relu(1.0 - m_cos - F.cosine_similarity(f, p, dim=1)).mean()
    return distmat, cos


def adaptive_vf_weight(nll: torch.Tensor, vf: torch.Tensor, layer: torch.Tensor, vf_weight: float,
                       max_weight: float = MAX_ADAPTIVE_VF) -> torch.Tensor:
    """``vf_weight * clamp(||d nll/dW|| / (||d vf/dW|| + 1e-4), 0, max_weight)``, detached (0-d tensor).

    0 when autograd is off (evaluation), as the reference does.
    """
    if not (torch.is_grad_enabled() and nll.requires_grad and vf.requires_grad and layer.requires_grad):
        return torch.zeros((), device=vf.device)
    g_nll = torch.autograd.grad(nll, layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf, layer, retain_graph=True)[0]
    ratio = g_nll.float().norm() / (g_vf.float().norm() + ADAPTIVE_EPS)
    return (ratio.clamp(0.0, max_weight) * vf_weight).detach()


# ---------------------------------------------------------------------------- model
class VAVAE(VAE):
    """VAE + bias-free 1x1 projection of the latent to the VFM width (+ the frozen VFM, outside the state)."""

    name = "vavae"

    def __init__(self, config: VAVAEConfig | None = None) -> None:
        config = config if config is not None else VAVAEConfig()
        if not isinstance(config, VAVAEConfig):
            raise ConfigError(f"vavae: expects a VAVAEConfig, got {type(config).__name__}")
        super().__init__(config)
        if config.attn_stages or config.downsample_padding != "same":
            self.encoder = LDMEncoder(config)
            self.decoder = LDMDecoder(config)
        self.vf_proj: nn.Conv2d | None = None
        if config.encoder is not None:
            dim = config.vf_dim or KNOWN_VFM_DIMS.get(config.encoder, 0)
            if dim == 0:  # unknown encoder: build it now to learn its width (and keep it)
                dim = self._attach_vfm().embed_dim
            self.vf_proj = nn.Conv2d(config.z_channels, dim, 1, bias=False)

    def last_layer(self) -> nn.Parameter:
        """Decoder output weight (the adaptive GAN weight's W)."""
        return self.decoder.conv_out.weight

    def encoder_last_layer(self) -> nn.Parameter:
        """Encoder output weight (the adaptive VF weight's W, as the reference's ``enc_last_layer``)."""
        return self.encoder.conv_out.weight

    # ----- the frozen VFM ---------------------------------------------------------------------
    def _attach_vfm(self) -> nn.Module:
        from manifold_lab.encoders import build_encoder

        cfg: VAVAEConfig = self.config
        enc = build_encoder(cfg.encoder, weights=cfg.encoder_weights)
        proj = self.__dict__.get("_modules", {}).get("vf_proj")
        if proj is not None and enc.embed_dim != proj.out_channels:
            raise ConfigError(f"vavae: encoder {cfg.encoder} gives {enc.embed_dim}-d tokens but vf_dim is "
                              f"{proj.out_channels}; set vf_dim: {enc.embed_dim} (or 0)")
        param = next(self.parameters(), None)
        if param is not None:
            enc = enc.to(param.device)
        return self.attach_frozen("vfm", enc)

    def vfm(self) -> nn.Module:
        """The frozen VFM (built from ``encoder``/``encoder_weights`` on first use)."""
        if self.config.encoder is None:
            raise ManifoldLabError("vavae: this model has no VFM (encoder: null)")
        frozen = self.__dict__["_frozen"]
        return frozen["vfm"] if "vfm" in frozen else self._attach_vfm()

    @torch.no_grad()
    def vfm_features(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """VFM tokens of images ``x`` in [-1,1] as a (B, D, h, w) float32 grid, resized to ``size``."""
        vfm = self.vfm()
        if self.config.vfm_imagenet_norm:
            feats = vfm(x)
        else:  # the reference: resize to the VFM input (bilinear), no mean/std normalisation
            s = vfm.input_size
            xi = x.to(vfm.pixel_mean.dtype)
            if tuple(xi.shape[-2:]) != (s, s):
                xi = F.interpolate(xi, size=(s, s), mode="bilinear", align_corners=False)
            feats = vfm.encode_normalized(xi)
        feats = feats.float()
        return resize_grid(feats, size) if size is not None else feats

    def reference_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The VF loss's target (:class:`~manifold_lab.tokenizers.base.HasReferenceMaps`): the VFM features
        resized to the latent grid, as the loss sees them; none without a VFM (``encoder: null``)."""
        if self.config.encoder is None:
            return {}
        self.check_images(x)
        return {"vfm_features": self.vfm_features(x, size=tuple(self.latent_shape[1:]))}

    # ----- training forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sample: bool = True
                ) -> tuple[torch.Tensor, DiagonalGaussian, torch.Tensor | None]:
        """(reconstruction, posterior, vf_proj(z) or None), z the posterior sample (mean if not ``sample``)."""
        posterior = self.encode_posterior(x)
        z = posterior.sample() if sample else posterior.mode()
        z_proj = self.vf_proj(z) if self.vf_proj is not None else None
        return self._decode(z), posterior, z_proj


# ---------------------------------------------------------------------------- criterion
class VAVAECriterion(TokenizerCriterion):
    """L1 + perceptual (+ GAN) + kl_weight * KL + w * VF loss (module docstring). Logs ``l1``,
    ``perceptual``, ``kl``, ``vf``, ``vf_distmat``, ``vf_cos``, ``vf_adaptive`` (the weight w)."""

    def __init__(self, config: VAVAEConfig) -> None:
        super().__init__(ReconstructionLoss(l1_weight=1.0, perceptual_weight=config.perceptual_weight,
                                            perceptual_name=config.perceptual_name, gan=config.gan))
        self.config = config

    def _nll(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """The reconstruction part alone (L1 + perceptual), recomputed when the GAN term is in ``rec``."""
        nll = self.recon.l1_weight * (recon.float() - x.float()).abs().mean()
        if self.recon.perceptual_weight > 0:
            p = perceptual_distance(self.recon.perceptual_name, x.device)(recon, x).float().mean()
            nll = nll + self.recon.perceptual_weight * p
        return nll

    def forward(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from manifold_lab.train import unwrap_model

        core: VAVAE = unwrap_model(model)
        cfg: VAVAEConfig = core.config
        x = batch_images(batch)
        recon, posterior, z_proj = model(x)
        rec, logs = self.recon(x, recon, step, last_layer=core.last_layer())
        kl = posterior.kl().float().mean() / x[0].numel()
        loss = rec + cfg.kl_weight * kl
        logs = dict(logs)
        logs["kl"] = kl.detach() * x[0].numel()
        if z_proj is not None and cfg.vf_weight > 0:
            feats = core.vfm_features(x, size=tuple(z_proj.shape[-2:]))
            distmat, cos = vf_loss_terms(z_proj, feats, cfg.m_dist, cfg.m_cos)
            vf = cfg.distmat_weight * distmat + cfg.cos_weight * cos
            if cfg.adaptive_vf:
                gan_in_rec = self.recon.gan.enabled and step >= self.recon.gan.start_step
                nll = self._nll(x, recon) if gan_in_rec else rec  # rec is exactly L1 + perceptual otherwise
                w = adaptive_vf_weight(nll, vf, core.encoder_last_layer(), cfg.vf_weight)
            else:
                w = torch.tensor(cfg.vf_weight, device=vf.device)
            loss = loss + w * vf
            logs.update(vf=vf.detach(), vf_distmat=distmat.detach(), vf_cos=cos.detach(), vf_adaptive=w.detach())
        return loss, logs


_RECIPES = Path(__file__).resolve().parent / "recipes"

VAVAE_SPEC = register_tokenizer(TokenizerSpec(
    name="vavae",
    config_cls=VAVAEConfig,
    build=VAVAE,
    criterion=VAVAECriterion,
    default_recipe=_RECIPES / "vavae_cpu.yaml",
    paper_recipe=_RECIPES / "vavae_imagenet256.yaml",
    description="VA-VAE (LightningDiT): LDM KL-VAE aligned to a frozen VFM by the VF loss "
                "(distance-matrix + marginal cosine margins, adaptive weight)",
))

__all__ = ["VAVAE", "VAVAEConfig", "VAVAECriterion", "VAVAE_SPEC", "LDMEncoder", "LDMDecoder", "LDMDownsample",
           "adaptive_vf_weight", "resize_grid", "vf_loss_terms", "KNOWN_VFM_DIMS"]
