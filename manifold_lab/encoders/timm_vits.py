"""The papers' frozen ViTs (DINOv2, DINOv3, SigLIP2, MAE) built by timm from a LOCAL weights file.

None of these weights can be downloaded here, so the model is created with
``timm.create_model(arch, pretrained=False)`` and the state dict is read from a file the user put
on disk (found by :mod:`manifold_lab.encoders.weights`, or passed explicitly). timm's own
checkpoint filter for the architecture is applied, so the original release formats load too
(Meta's ``dinov2_*_pretrain.pth`` / ``dinov3_*.pth``, MAE's ``mae_pretrain_vit_base.pth``), and
absolute position embeddings are resampled to the input size used here.

Input sizes (chosen so that every encoder gives the 16x16 grid the RAE/PAE papers use):

* DINOv2 (patch 14): 224x224 -> 16x16. The checkpoints' 37x37 position embeddings (518 px) are
  bicubically resampled to 16x16, as DINOv2 itself does for other resolutions.
* DINOv3 (patch 16, RoPE, no absolute positions): 256x256 -> 16x16, the native size.
* SigLIP2 B/16: the 256-px timm variant ``vit_base_patch16_siglip_256.v2_webli`` -> 16x16, native.
* MAE B/16 (trained at 224): 256x256 -> 16x16 with position embeddings resampled from 14x14, as the
  RAE paper does; pass ``input_size=224`` for the native 14x14 grid.

Normalisation comes from the model's ``pretrained_cfg`` (ImageNet mean/std for DINO/MAE, 0.5/0.5
for SigLIP). Output: patch tokens only; the CLS, register and other prefix tokens
(``num_prefix_tokens``) are dropped. ``final_norm_affine=False`` replaces the final LayerNorm by
one without weight and bias (RAE and PAE use the VFM's last norm without its affine part).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from manifold_lab.encoders.base import ENCODERS, FrozenEncoder
from manifold_lab.encoders.weights import file_identity, find_weights, load_state_dict_file
from manifold_lab.errors import CheckpointError, ConfigError, MissingWeightsError


@dataclass(frozen=True)
class TimmViTSpec:
    """How one named encoder maps onto timm and which weight files are accepted for it."""

    arch: str  # timm architecture name with its pretrained tag
    input_size: int
    release_files: tuple[str, ...] = ()  # original (non-timm) release file names, globs allowed

    def file_names(self, name: str) -> list[str]:
        names = [f"{name}.safetensors", f"{name}.pth", f"{name}.bin",
                 f"{self.arch}.safetensors", f"{self.arch}.pth", f"{self.arch}.bin"]
        return names + list(self.release_files)


TIMM_VITS: dict[str, TimmViTSpec] = {
    "dinov2_vits14": TimmViTSpec("vit_small_patch14_dinov2.lvd142m", 224, ("dinov2_vits14_pretrain.pth",)),
    "dinov2_vitb14": TimmViTSpec("vit_base_patch14_dinov2.lvd142m", 224, ("dinov2_vitb14_pretrain.pth",)),
    "dinov2_vitl14": TimmViTSpec("vit_large_patch14_dinov2.lvd142m", 224, ("dinov2_vitl14_pretrain.pth",)),
    "dinov2_vitb14_reg": TimmViTSpec("vit_base_patch14_reg4_dinov2.lvd142m", 224,
                                     ("dinov2_vitb14_reg4_pretrain.pth",)),
    "dinov2_vitl14_reg": TimmViTSpec("vit_large_patch14_reg4_dinov2.lvd142m", 224,
                                     ("dinov2_vitl14_reg4_pretrain.pth",)),
    "dinov3_vits16plus": TimmViTSpec("vit_small_plus_patch16_dinov3.lvd1689m", 256,
                                     ("dinov3_vits16plus_pretrain_lvd1689m*.pth",)),
    "dinov3_vitb16": TimmViTSpec("vit_base_patch16_dinov3.lvd1689m", 256,
                                 ("dinov3_vitb16_pretrain_lvd1689m*.pth",)),
    "siglip2_vitb16": TimmViTSpec("vit_base_patch16_siglip_256.v2_webli", 256),
    "mae_vitb16": TimmViTSpec("vit_base_patch16_224.mae", 256, ("mae_pretrain_vit_base.pth",)),
}


def _timm_filter_fn(model: nn.Module):
    """timm's checkpoint filter for the model's architecture family (converts release formats)."""
    return getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)


def _one_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines[:3])[:400] if lines else type(exc).__name__


def load_timm_weights(model: nn.Module, path: Path, what: str) -> None:
    """Load a state dict file into a timm model: release-format conversion, then strict matching.

    A classifier head in the file is ignored (the encoder has none); every other missing,
    unexpected or mis-shaped key is a :class:`CheckpointError`.
    """
    state = load_state_dict_file(path)
    filter_fn = _timm_filter_fn(model)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # timm raises assorted errors on foreign layouts
            raise CheckpointError(
                f"weights file {path} does not fit {what} ({type(exc).__name__}: {_one_line(exc)}); "
                "pass that model's own weights"
            ) from exc
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc_norm."))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches, e.g. {k}: file {tuple(state[k].shape)} vs model "
                         f"{tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise CheckpointError(f"weights file {path} does not match {what}: {'; '.join(parts)}; "
                              "pass the weights of exactly this architecture")
    model.load_state_dict(state, strict=True)


class TimmViTEncoder(FrozenEncoder):
    """A timm ViT whose patch tokens form the token grid (prefix tokens dropped)."""

    def __init__(self, name: str, weights: str | os.PathLike | None = None, input_size: int | None = None,
                 final_norm_affine: bool = True, model_kwargs: dict[str, Any] | None = None,
                 input_grad: bool = False) -> None:
        if name not in TIMM_VITS:
            raise ConfigError(f"unknown timm encoder '{name}'; valid names: {', '.join(sorted(TIMM_VITS))}")
        spec = TIMM_VITS[name]
        size = int(input_size or spec.input_size)
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise MissingWeightsError(f"weights file for {name} not found: {path}; check the path")
        else:
            path = find_weights(spec.file_names(name), f"encoder {name} ({spec.arch})", hf_repos=[f"timm/{spec.arch}"])
        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("img_size", size)
        try:
            model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"encoder {name}: timm cannot build {spec.arch} with {kwargs} ({exc})") from exc
        patch = model.patch_embed.patch_size
        patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        if size % patch[0] or size % patch[1]:
            raise ConfigError(f"encoder {name}: input_size {size} is not a multiple of its patch size {patch[0]}")
        load_timm_weights(model, path, f"encoder {name} ({spec.arch})")
        if not final_norm_affine:
            eps = getattr(model.norm, "eps", 1e-6)
            model.norm = nn.LayerNorm(model.num_features, eps=eps, elementwise_affine=False)
        data_cfg = resolve_model_data_config(model)
        super().__init__(name=name, embed_dim=model.num_features, input_size=size,
                         grid_size=(size // patch[0], size // patch[1]), mean=tuple(data_cfg["mean"]),
                         std=tuple(data_cfg["std"]), weights_path=str(path), input_grad=input_grad)
        self.arch = spec.arch
        self.final_norm_affine = bool(final_norm_affine)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.model = model
        self.freeze()

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        patches = tokens[:, self.num_prefix_tokens:]
        h, w = self.grid_size
        if patches.shape[1] != h * w:
            raise CheckpointError(f"encoder {self.name} produced {patches.shape[1]} patch tokens, expected {h}x{w}")
        return patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def identity(self) -> str:
        norm = "" if self.final_norm_affine else "|norm-noaffine"
        return f"{self.name}@{self.input_size}{norm}|{file_identity(self.weights_path)}"


def _register(name: str) -> None:
    def factory(weights: str | os.PathLike | None = None, **kw) -> TimmViTEncoder:
        return TimmViTEncoder(name, weights=weights, **kw)

    factory.__name__ = f"build_{name}"
    factory.__doc__ = f"Frozen {name} ({TIMM_VITS[name].arch}) from a local weights file."
    ENCODERS.register(name, factory)


for _name in TIMM_VITS:
    _register(_name)
