"""Converter for RAE's released decoders and normalisation statistics (github.com/bytetriper/RAE).

What the release holds (learned from the reference code, ``src/stage1/rae.py``,
``src/stage1/decoders/decoder.py``, ``src/extract_decoder.py``, ``src/calculate_stat.py`` and the
``configs/stage1/pretrained/*.yaml`` that point at ``models/decoders/<enc>/<variant>/model.pt`` and
``models/stats/<enc>/<variant>/imagenet1k/stat.pt`` in the HF repo ``nyu-visionx/RAE-collections``):

* the decoder file is ``torch.save(GeneralDecoder.state_dict())`` -- an HF ViT-MAE decoder::

      decoder_embed.{weight,bias}                      (W, D), (W,)       D = encoder width (768)
      decoder_pos_embed                                (1, N+1, W)        fixed MAE sin-cos, zero CLS row
      trainable_cls_token                              (1, 1, W)
      decoder_layers.{i}.layernorm_before.{weight,bias}
      decoder_layers.{i}.attention.attention.{query,key,value}.{weight,bias}   (W, W), (W,)
      decoder_layers.{i}.attention.output.dense.{weight,bias}                  (W, W), (W,)
      decoder_layers.{i}.layernorm_after.{weight,bias}
      decoder_layers.{i}.intermediate.dense.{weight,bias}                      (M, W), (M,)
      decoder_layers.{i}.output.dense.{weight,bias}                            (W, M), (W,)
      decoder_norm.{weight,bias}
      decoder_pred.{weight,bias}                       (p*p*3, W)          pixels in the encoder's
                                                                           normalised space
  (ViT-XL: W 1152, 28 layers, 16 heads, M 4096, LayerNorm eps 1e-12, erf GELU; p 16, N 256.)
* the stats file is ``torch.save({"mean": (C, H, W), "var": (C, H, W)})``; RAE normalises with
  ``(z - mean) / sqrt(var + 1e-5)``.

Both map onto :class:`manifold_lab.tokenizers.rae.RAE` with ``decoder_arch: mae`` and
``pixel_output: encoder``. Width, depth, MLP width, patch and grid are read from the tensor shapes;
the number of heads is not visible in any shape (``num_heads``; default from RAE's configs: 768 -> 12,
1024 -> 16, 1152 -> 16). Everything is strict: every expected key present, no extra key, each shape
checked, one :class:`CheckpointError` line otherwise.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from manifold_lab.encoders.weights import load_state_dict_file
from manifold_lab.errors import CheckpointError, ManifoldLabError
from manifold_lab.tokenizers.convert import CONVERTERS
from manifold_lab.tokenizers.rae import RAE, RAEConfig

#: decoder widths of RAE's released configs (configs/decoder/ViT{B,L,XL}/config.json) -> heads
RELEASED_HEADS = {768: 12, 1024: 16, 1152: 16}
#: images RAE's released ImageNet statistics were estimated on (train split, momentum estimate)
IMAGENET_TRAIN_IMAGES = 1_281_167

_LAYER_MAP = {
    "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
    "attention.attention.query.weight": "q.weight", "attention.attention.query.bias": "q.bias",
    "attention.attention.key.weight": "k.weight", "attention.attention.key.bias": "k.bias",
    "attention.attention.value.weight": "v.weight", "attention.attention.value.bias": "v.bias",
    "attention.output.dense.weight": "proj.weight", "attention.output.dense.bias": "proj.bias",
    "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "fc1.weight", "intermediate.dense.bias": "fc1.bias",
    "output.dense.weight": "fc2.weight", "output.dense.bias": "fc2.bias",
}
_TOP_MAP = {
    "decoder_embed.weight": "decoder.embed.weight", "decoder_embed.bias": "decoder.embed.bias",
    "decoder_pos_embed": "decoder.pos_embed", "trainable_cls_token": "decoder.cls_token",
    "decoder_norm.weight": "decoder.norm.weight", "decoder_norm.bias": "decoder.norm.bias",
    "decoder_pred.weight": "decoder.head.weight", "decoder_pred.bias": "decoder.head.bias",
}


def key_map(depth: int) -> dict[str, str]:
    """Official decoder key -> key in :class:`RAE`'s state dict, for ``depth`` layers."""
    mapping = dict(_TOP_MAP)
    for i in range(depth):
        for src, dst in _LAYER_MAP.items():
            mapping[f"decoder_layers.{i}.{src}"] = f"decoder.blocks.{i}.{dst}"
    return mapping


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a full stage-1 RAE state dict (``decoder.`` prefix) or DDP/compile prefixes as well."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if "decoder_embed.weight" not in out and "decoder.decoder_embed.weight" in out:
        out = {k[len("decoder."):]: v for k, v in out.items() if k.startswith("decoder.")}
    return out


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def read_decoder(src: str | Path) -> dict[str, torch.Tensor]:
    """The official decoder state dict of ``src`` (key layout checked later)."""
    state = _strip_wrappers(load_state_dict_file(src))
    if "decoder_embed.weight" not in state or "decoder_pred.weight" not in state:
        some = ", ".join(sorted(state)[:3]) or "no keys"
        raise CheckpointError(
            f"{src} is not an RAE decoder checkpoint (no decoder_embed/decoder_pred weights; it has {some}); "
            "pass the released models/decoders/.../model.pt"
        )
    return state


def read_stats(path: str | Path, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """RAE's ``{"mean", "var"}`` stats file, each (C, H, W) (a leading batch axis of 1 is accepted)."""
    stats = load_state_dict_file(path)
    if set(stats) != {"mean", "var"}:
        raise CheckpointError(
            f"{path} is not an RAE statistics file: keys {sorted(stats)[:4]}, expected exactly 'mean' and 'var'; "
            "pass the released models/stats/.../stat.pt"
        )
    out = []
    for name in ("mean", "var"):
        t = stats[name]
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if _shape(t) != tuple(shape):
            raise CheckpointError(
                f"{path}: '{name}' has shape {_shape(stats[name])}, but this encoder's latent is {tuple(shape)}; "
                "pass the statistics computed for the same encoder and resolution"
            )
        out.append(t.float())
    if bool((out[1] < 0).any()) or not all(bool(torch.isfinite(t).all()) for t in out):
        raise CheckpointError(f"{path}: statistics must be finite with var >= 0")
    return out[0], out[1]


@CONVERTERS.register("rae")
def convert(src: str | Path, stats: str | Path | None = None, encoder: str = "dinov2_vitb14_reg",
            encoder_weights: str | None = None, encoder_input_size: int | None = 224,
            final_norm_affine: bool = False, num_heads: int | None = None, layer_norm_eps: float = 1e-12,
            noise_tau: float = 0.8, stats_images: int = IMAGENET_TRAIN_IMAGES, **model_overrides: Any) -> RAE:
    """An :class:`RAE` from RAE's released decoder ``src`` and (optionally) its stats file ``stats``.

    ``encoder*`` name the frozen encoder the decoder was trained on (default: RAE's DINOv2-B with
    registers, 224 px, final norm without affine). Without ``stats`` the per-element normaliser stays
    the identity (encode returns raw tokens). ``model_overrides`` go to :class:`RAEConfig` (e.g.
    ``perceptual_name``) for fine-tuning.
    """
    state = read_decoder(src)
    width, in_dim = _shape(state["decoder_embed.weight"])
    layer_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"decoder_layers\.(\d+)\.", k))})
    depth = len(layer_ids)
    if depth == 0 or layer_ids != list(range(depth)):
        raise CheckpointError(f"{src}: decoder layers are not numbered 0..n-1 (found {layer_ids[:6]}); the file is damaged")
    fc1 = state.get("decoder_layers.0.intermediate.dense.weight")
    if fc1 is None:
        raise CheckpointError(f"{src} lacks decoder_layers.0.intermediate.dense.weight; not an RAE (ViT-MAE) decoder")
    mlp_dim = int(fc1.shape[0])
    out_dim = int(state["decoder_pred.weight"].shape[0])
    patch = math.isqrt(out_dim // 3)
    if patch * patch * 3 != out_dim:
        raise CheckpointError(f"{src}: decoder_pred has {out_dim} outputs, not 3 * patch^2")
    pos = state.get("decoder_pos_embed")
    if pos is None or pos.ndim != 3:
        raise CheckpointError(f"{src} lacks decoder_pos_embed (1, N+1, width); not an RAE decoder")
    grid = math.isqrt(int(pos.shape[1]) - 1)
    if grid * grid != int(pos.shape[1]) - 1:
        raise CheckpointError(f"{src}: decoder_pos_embed has {int(pos.shape[1]) - 1} patch rows, not a square grid")
    heads = num_heads if num_heads is not None else RELEASED_HEADS.get(width)
    if heads is None:
        raise CheckpointError(f"{src}: decoder width {width} is not one of RAE's released configs; pass num_heads")
    try:
        config = RAEConfig(image_size=grid * patch, encoder=encoder, encoder_weights=encoder_weights,
                           encoder_input_size=encoder_input_size, final_norm_affine=final_norm_affine,
                           decoder_arch="mae", pixel_output="encoder", decoder_width=width, decoder_depth=depth,
                           decoder_heads=heads, decoder_mlp_ratio=mlp_dim / width, decoder_ln_eps=layer_norm_eps,
                           noise_tau=noise_tau, **model_overrides)
    except TypeError as exc:
        raise ManifoldLabError(f"rae converter: unknown option ({exc})") from exc
    model = RAE(config)
    c, h, w = model.latent_shape
    if (c, h, w) != (in_dim, grid, grid):
        raise CheckpointError(
            f"{src}: the decoder takes {in_dim}-d tokens on a {grid}x{grid} grid, but encoder '{encoder}' "
            f"(input {encoder_input_size or 'default'}) gives {c}x{h}x{w}; pass the encoder it was trained on"
        )
    mapping = key_map(depth)
    missing = sorted(set(mapping) - set(state))
    unexpected = sorted(set(state) - set(mapping))
    target = model.state_dict()
    wrong = [f"{k} {_shape(state[k])} vs {_shape(target[mapping[k]])}" for k in sorted(set(mapping) & set(state))
             if _shape(state[k]) != _shape(target[mapping[k]])]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong)):
        if items:
            problems.append(f"{label}: " + ", ".join(items[:3]) + (f", ... (+{len(items) - 3})" if len(items) > 3 else ""))
    if problems:
        raise CheckpointError(f"{src} does not match RAE's decoder layout ({'; '.join(problems)}); "
                              "pass an unmodified released decoder")
    new_state = {mapping[k]: state[k].to(target[mapping[k]].dtype) for k in mapping}
    if stats is not None:
        mean, var = read_stats(stats, (c, h, w))
        new_state.update(latent_mean=mean, latent_var=var,
                         latent_stats_images=torch.tensor(int(stats_images), dtype=torch.long))
    else:
        new_state.update(latent_mean=target["latent_mean"], latent_var=target["latent_var"],
                         latent_stats_images=target["latent_stats_images"])
    model.load_state_dict(new_state, strict=True)
    return model.eval()


__all__ = ["convert", "key_map", "read_decoder", "read_stats", "RELEASED_HEADS"]
