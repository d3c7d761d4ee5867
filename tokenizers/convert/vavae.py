"""Released LDM KL-VAE / VA-VAE checkpoints -> :class:`~manifold_lab.tokenizers.vavae.VAVAE`.

Source layout (LDM ``AutoencoderKL``, ``ldm/modules/diffusionmodules/model.py`` in CompVis/latent-diffusion
and hustvl/LightningDiT ``vavae/``; the released ``vavae-imagenet256-f16d32-dinov2.pt`` is a dict with a
``state_dict`` in this layout, read by LightningDiT's ``tokenizer/autoencoder.py``)::

    encoder.conv_in                          -> encoder.conv_in
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}
                                             -> encoder.stages.{i}.blocks.{j}.{norm1,conv1,norm2,conv2,skip}
    encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}   (levels in attn_resolutions)
                                             -> encoder.stages.{i}.attn.{j}.{norm, attn.qkv, attn.proj}
    encoder.down.{i}.downsample.conv         -> encoder.stages.{i}.down.conv   (pad (0,1,0,1), no conv padding)
    encoder.mid.{block_1,attn_1,block_2}     -> encoder.mid.{block1,attn,block2}
    encoder.{norm_out,conv_out}, quant_conv, post_quant_conv, decoder.{conv_in,mid,norm_out,conv_out}: same
    decoder.up.{i}.block.{j} / .attn.{j} / .upsample.conv   (i = resolution level, 0 = full size;
                                             LDM builds the list reversed and prepends)
                                             -> decoder.stages.{L-1-i}.blocks.{j} / .attn.{j} / .up.conv
    linear_proj.weight  [D, E, 1, 1] (VA-VAE, reverse_proj: z -> VFM, no bias) -> vf_proj.weight

Attention: LDM's q, k, v, proj_out are 1x1 convolutions; ours is timm ``Attention`` (one head, scale
C^-0.5, same softmax(q k^T) v), so ``attn.qkv.weight = cat(q, k, v)`` with the 1x1 kernels squeezed,
``attn.qkv.bias = cat(q.bias, k.bias, v.bias)``, ``attn.proj = proj_out``.

Dropped by rule: ``loss.*`` (discriminator, LPIPS, logvar), ``foundation_model.*`` (a copy of the frozen
VFM) and, for ``vae-ldm``, ``linear_proj.*``. Every other key must be mapped and every expected key
present with its shape, else one :class:`CheckpointError` line. A full LDM / Stable Diffusion checkpoint
is accepted too: its ``first_stage_model.`` sub-dict is used (the rest ignored).

Inferred from shapes: base channels, ch_mult, num_res_blocks, z_channels, levels with attention,
VFM width. Not inferable (options): ``image_size`` (LDM ``resolution``, 256), ``norm_groups`` (32 in
LDM), ``encoder`` (the VFM name, ``dinov2_vitl14`` for the release, DINOv2-L without registers).
Latent statistics: pass ``latent_stats=`` the release's ``latents_stats.pt`` (``{"mean", "std"}`` of
shape [1, C, 1, 1]) to carry them; otherwise identity statistics are kept.

Note: LightningDiT extracts latents with ``posterior.sample()``; ``VAVAE.encode`` returns the mean.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from manifold_lab.errors import CheckpointError, ManifoldLabError
from manifold_lab.tokenizers.base import LatentStats
from manifold_lab.tokenizers.convert import CONVERTERS
from manifold_lab.tokenizers.vavae import VAVAE, VAVAEConfig

DROP_PREFIXES = ("loss.", "foundation_model.")
SUBMODEL_PREFIXES = ("first_stage_model.",)
_ATTN_PARTS = ("q", "k", "v")


def _read(src: str | Path | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(src, Mapping):
        state, where = dict(src), "state dict"
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = dict(state[key])
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError("state dict passed to the vavae converter holds non-tensor values")
        return state, where
    from manifold_lab.encoders.weights import load_state_dict_file

    return load_state_dict_file(src), str(src)


def _select(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if "encoder.conv_in.weight" in state:
        return state
    for prefix in SUBMODEL_PREFIXES:
        if prefix + "encoder.conv_in.weight" in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    raise CheckpointError(f"{where} has no encoder.conv_in.weight (nor first_stage_model.encoder.conv_in.weight); "
                          "it is not an LDM AutoencoderKL / VA-VAE checkpoint")


# ---------------------------------------------------------------------------- key mapping
def our_to_ldm(key: str, levels: int) -> str | tuple[str, ...]:
    """LDM source name of one of our state-dict keys (a tuple of q,k,v names for a fused qkv)."""
    k = key
    if k == "vf_proj.weight":
        return "linear_proj.weight"
    m = re.match(r"decoder\.stages\.(\d+)\.(.*)$", k)
    if m:  # reversed level indexing
        k = f"decoder.up.{levels - 1 - int(m.group(1))}.{m.group(2)}"
    else:
        k = re.sub(r"^encoder\.stages\.(\d+)\.", r"encoder.down.\1.", k)
    k = re.sub(r"\.(down|up)\.(\d+)\.blocks\.", r".\1.\2.block.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.down\.conv\.", r"encoder.down.\1.downsample.conv.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.up\.conv\.", r"decoder.up.\1.upsample.conv.", k)
    k = k.replace(".skip.", ".nin_shortcut.")
    k = k.replace(".mid.block1.", ".mid.block_1.").replace(".mid.block2.", ".mid.block_2.")
    k = k.replace(".mid.attn.", ".mid.attn_1.")
    m = re.match(r"(.*)\.attn\.qkv\.(weight|bias)$", k)
    if m:
        return tuple(f"{m.group(1)}.{p}.{m.group(2)}" for p in _ATTN_PARTS)
    return re.sub(r"\.attn\.proj\.(weight|bias)$", r".proj_out.\1", k)


def _conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 and tuple(t.shape[2:]) == (1, 1) else t


def to_ldm_state_dict(model: VAVAE) -> dict[str, torch.Tensor]:
    """Our state dict in the LDM layout (the inverse of the conversion; for round-trip checks/export)."""
    levels = len(model.config.ch_mult)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        src = our_to_ldm(key, levels)
        if isinstance(src, tuple):
            for name, part in zip(src, t.chunk(3, dim=0)):
                out[name] = part.reshape(part.shape[0], -1, 1, 1).clone() if part.ndim == 2 else part.clone()
        elif key.endswith("attn.proj.weight"):
            out[src] = t.reshape(t.shape[0], t.shape[1], 1, 1).clone()
        else:
            out[src] = t.clone()
    return out


# ---------------------------------------------------------------------------- config inference
def _shape(state: dict[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{where} lacks {key}; it is not a complete LDM AutoencoderKL checkpoint")
    return tuple(state[key].shape)


def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def infer_config(state: dict[str, torch.Tensor], where: str = "checkpoint", *, with_vf: bool = True,
                 **overrides: Any) -> VAVAEConfig:
    """The VAVAEConfig whose state dict matches ``state`` (LDM layout), plus ``overrides``."""
    base, in_ch = _shape(state, "encoder.conv_in.weight", where)[:2]
    levels = len(_indices(state, r"encoder\.down\.(\d+)\."))
    blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight"))
    if levels < 1 or blocks < 1:
        raise CheckpointError(f"{where} has no encoder.down.{{i}}.block.{{j}} entries; not an LDM encoder")
    mult = []
    for i in range(levels):
        width = _shape(state, f"encoder.down.{i}.block.0.conv2.weight", where)[0]
        if width % base:
            raise CheckpointError(f"{where}: encoder level {i} width {width} is not a multiple of conv_in width "
                                  f"{base}; not an LDM encoder")
        mult.append(width // base)
    embed2, zd2 = _shape(state, "quant_conv.weight", where)[:2]
    if embed2 != zd2:
        raise CheckpointError(f"{where}: quant_conv maps {zd2} -> {embed2} channels (ddconfig z_channels "
                              f"{zd2 // 2} != embed_dim {embed2 // 2}); VAVAE needs them equal")
    enc_attn = _indices(state, r"encoder\.down\.(\d+)\.attn\.0\.")
    dec_attn = _indices(state, r"decoder\.up\.(\d+)\.attn\.0\.")
    if enc_attn != dec_attn:
        raise CheckpointError(f"{where}: attention at encoder levels {enc_attn} but decoder levels {dec_attn}; "
                              "VAVAE uses one attn_stages list for both")
    for part in ("encoder", "decoder"):
        if f"{part}.mid.attn_1.q.weight" not in state:
            raise CheckpointError(f"{where} lacks {part}.mid.attn_1.q.weight: only LDM's vanilla mid attention "
                                  "is supported (not 'linear' or 'none')")
    out_ch = _shape(state, "decoder.conv_out.weight", where)[0]
    if out_ch != in_ch:
        raise CheckpointError(f"{where}: {in_ch} input but {out_ch} output channels; VAVAE needs them equal")
    fields: dict[str, Any] = dict(
        image_size=256, in_channels=in_ch, base_channels=base, ch_mult=tuple(mult), num_res_blocks=blocks,
        mid_attention=True, z_channels=embed2 // 2, dropout=0.0, norm_groups=32, attn_stages=tuple(enc_attn),
        downsample_padding="ldm", kl_weight=1e-6, perceptual_weight=1.0, perceptual_name="lpips-vgg")
    if with_vf:
        if "linear_proj.bias" in state:
            raise CheckpointError(f"{where}: linear_proj has a bias, the reverse_proj=False layout (VFM -> latent), "
                                  "which VAVAE does not represent; convert with 'vae-ldm' to drop it")
        dim, e = _shape(state, "linear_proj.weight", where)[:2]
        if e != embed2 // 2:
            raise CheckpointError(f"{where}: linear_proj.weight takes {e} channels but the latent has {embed2 // 2}")
        fields.update(encoder="dinov2_vitl14", vf_dim=dim, vfm_imagenet_norm=False, vf_weight=0.1,
                      adaptive_vf=True, m_dist=0.25, m_cos=0.5)
    else:
        fields.update(encoder=None, vf_dim=0, vf_weight=0.0)
    fields.update(overrides)
    try:
        return VAVAEConfig(**fields)
    except (TypeError, ManifoldLabError) as exc:
        raise CheckpointError(f"{where}: options do not make a valid VAVAE config ({exc})") from exc


# ---------------------------------------------------------------------------- conversion
def convert_state(state: dict[str, torch.Tensor], where: str = "checkpoint", *, with_vf: bool = True,
                  latent_stats: str | Path | Mapping[str, torch.Tensor] | None = None, **options: Any) -> VAVAE:
    """LDM-layout state dict -> VAVAE with exactly those weights (strict; see the module docstring)."""
    state = _select(state, where)
    drops = DROP_PREFIXES + (() if with_vf else ("linear_proj.",))
    state = {k: v for k, v in state.items() if not k.startswith(drops)}
    config = infer_config(state, where, with_vf=with_vf, **options)
    model = VAVAE(config)
    levels = len(config.ch_mult)
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    for key, target in own.items():
        src = our_to_ldm(key, levels)
        names = src if isinstance(src, tuple) else (src,)
        absent = [n for n in names if n not in state]
        if absent:
            missing.extend(absent)
            continue
        parts = [state[n] for n in names]
        used.update(names)
        if isinstance(src, tuple) or key.endswith("attn.proj.weight"):
            parts = [_conv1x1_to_linear(p) for p in parts]
        if len({tuple(p.shape) for p in parts}) > 1:
            wrong.append(f"{'+'.join(names)} {' / '.join(str(tuple(p.shape)) for p in parts)} differ")
            continue
        tensor = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        if tuple(tensor.shape) != tuple(target.shape):
            wrong.append(f"{'+'.join(names)} {tuple(tensor.shape)} vs {tuple(target.shape)} expected")
            continue
        new[key] = tensor.to(target.dtype)
    unexpected = sorted(set(state) - used)
    problems = []
    for label, items in (("missing", sorted(missing)), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            problems.append(f"{label}: " + ", ".join(items[:3]) + (f", ... (+{len(items) - 3})" if len(items) > 3 else ""))
    if problems:
        raise CheckpointError(f"{where} does not match the LDM AutoencoderKL layout inferred from its shapes "
                              f"({'; '.join(problems)})")
    model.load_state_dict(new, strict=True)
    if latent_stats is not None:
        model.set_latent_stats(_read_stats(latent_stats, config.z_channels))
    return model.eval()


def _read_stats(src: str | Path | Mapping[str, torch.Tensor], channels: int) -> LatentStats:
    if isinstance(src, Mapping):
        stats, where = src, "latent stats"
    else:
        where = str(src)
        try:
            stats = torch.load(str(src), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"latent stats file {src} is unreadable ({type(exc).__name__}); pass the "
                                  "release's latents_stats.pt") from exc
    if not isinstance(stats, Mapping) or not {"mean", "std"} <= set(stats):
        raise CheckpointError(f"{where} must hold 'mean' and 'std' tensors (per-channel latent statistics)")
    mean, std = (torch.as_tensor(stats[k]).reshape(-1) for k in ("mean", "std"))
    if mean.numel() != channels or std.numel() != channels:
        raise CheckpointError(f"{where} has {mean.numel()} channels; the latent has {channels}")
    return LatentStats(mean, std, f"from {Path(where).name if where != 'latent stats' else where} "
                                  "(released per-channel mean/std)")


@CONVERTERS.register("vavae")
def convert_vavae(src: str | Path | Mapping[str, torch.Tensor], **options: Any) -> VAVAE:
    """Released VA-VAE (``vavae-imagenet256-f16d32-dinov2.pt``) -> VAVAE with its VF projection.

    Options: ``image_size`` (256), ``norm_groups`` (32), ``encoder`` ("dinov2_vitl14"),
    ``encoder_weights``, ``latent_stats`` (path to ``latents_stats.pt``), any other VAVAEConfig field.
    """
    state, where = _read(src)
    return convert_state(state, where, with_vf=True, **options)


@CONVERTERS.register("vae-ldm")
def convert_vae_ldm(src: str | Path | Mapping[str, torch.Tensor], **options: Any) -> VAVAE:
    """A plain LDM KL-VAE (or the autoencoder part of a VA-VAE, ``linear_proj`` dropped) -> VAVAE with
    ``encoder: null`` (no VFM, vf_weight 0): the LDM layout needs VAVAE's ``downsample_padding: ldm``
    and ``attn_stages``, which the plain VAE does not have."""
    state, where = _read(src)
    return convert_state(state, where, with_vf=False, **options)


__all__ = ["convert_state", "convert_vae_ldm", "convert_vavae", "infer_config", "our_to_ldm", "to_ldm_state_dict"]
