"""Frozen pretrained networks: the VFM token encoders, the FID backbones and a feature cache.

``build_encoder(name)`` returns a :class:`FrozenEncoder` (images in [-1,1] -> token grid
(B, D, h, w)). ``mobilenet_v2`` is the embedded default whose ImageNet weights are always on the
machine; the DINOv2/DINOv3/SigLIP2/MAE ViTs need a local weights file (see
:mod:`manifold_lab.encoders.weights` for where they are looked up).
"""

from __future__ import annotations

import os

from manifold_lab.encoders import mobilenet as _mobilenet  # noqa: F401  (registers "mobilenet_v2")
from manifold_lab.encoders import timm_vits as _timm_vits  # noqa: F401  (registers the ViTs)
from manifold_lab.encoders.base import ENCODERS, FrozenEncoder
from manifold_lab.encoders.feature_cache import cached_features
from manifold_lab.encoders.fid_backbones import FID_BACKBONES, FIDBackbone, build_fid_backbone
from manifold_lab.encoders.mobilenet import MobileNetV2Encoder, load_mobilenet_v2
from manifold_lab.encoders.timm_vits import TIMM_VITS, TimmViTEncoder

#: The encoder used when a config names none: the only one whose real weights are always present.
DEFAULT_ENCODER = "mobilenet_v2"


def build_encoder(name: str = DEFAULT_ENCODER, weights: str | os.PathLike | None = None, **kw) -> FrozenEncoder:
    """A frozen encoder by registry name; ``weights`` overrides the weights file lookup.

    Extra keywords go to the encoder (e.g. ``input_size``, ``stage`` for MobileNetV2,
    ``final_norm_affine`` / ``model_kwargs`` for the timm ViTs).
    """
    return ENCODERS.get(name)(weights=weights, **kw)


__all__ = [
    "DEFAULT_ENCODER", "ENCODERS", "FID_BACKBONES", "FIDBackbone", "FrozenEncoder", "MobileNetV2Encoder",
    "TIMM_VITS", "TimmViTEncoder", "build_encoder", "build_fid_backbone", "cached_features", "load_mobilenet_v2",
]
