"""Image and mask geometry shared by the datasets.

All datasets hand out float images in [-1, 1], (3, S, S). Photos go through the ADM/DiT
preprocessing (:func:`center_crop_arr`), the de-facto standard for ImageNet-256 latent diffusion,
so that a latent measured here is the latent a diffusion model would be trained on. Masks follow
exactly the same geometry with nearest-neighbour sampling so each pixel keeps its integer id.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _crop_box(width: int, height: int, image_size: int) -> tuple[int, int]:
    return (width - image_size) // 2, (height - image_size) // 2


def center_crop_arr(pil_image: Image.Image, image_size: int, resample: int = Image.BICUBIC,
                    downsample: int = Image.BOX) -> Image.Image:
    """ADM preprocessing: halve with BOX while the short side is >= 2*size, BICUBIC to short side == size, centre crop.

    The repeated BOX halving avoids aliasing from one large bicubic step. ``resample`` and
    ``downsample`` are replaced by NEAREST for masks (see :func:`center_crop_mask`). Returns a
    ``image_size`` x ``image_size`` PIL image.
    """
    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=downsample)
    scale = image_size / min(img.size)
    new_size = (max(image_size, round(img.size[0] * scale)), max(image_size, round(img.size[1] * scale)))
    img = img.resize(new_size, resample=resample)
    left, top = _crop_box(img.size[0], img.size[1], image_size)
    return img.crop((left, top, left + image_size, top + image_size))


def center_crop_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """An integer id mask (H, W) through the same geometry as :func:`center_crop_arr`, with NEAREST."""
    pil = Image.fromarray(mask.astype(np.int32), mode="I")
    out = center_crop_arr(pil, image_size, resample=Image.NEAREST, downsample=Image.NEAREST)
    return np.asarray(out, dtype=np.int64)


def pil_to_tensor_pm1(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return uint8_to_pm1(torch.from_numpy(arr.copy()).permute(2, 0, 1))


def uint8_to_pm1(x: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..255 -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return x.to(torch.float32) / 127.5 - 1.0


def resize_float(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a float (C,H,W) or (B,C,H,W) tensor (identity at the same size)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    batched = x.ndim == 4
    xb = x if batched else x.unsqueeze(0)
    if tuple(xb.shape[-2:]) != size:
        xb = F.interpolate(xb, size=size, mode="bilinear", align_corners=False, antialias=True)
    return xb if batched else xb.squeeze(0)


def grey28_to_image(item: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """A 28x28 uint8 grey item -> (3, S, S) float in [-1, 1].

    S == 32 pads 2 px of background (value 0) on every side, keeping the exact pixels; S == 28 is
    the identity; any other S is an antialiased bilinear resize. Grey is replicated to 3 channels.
    """
    if isinstance(item, torch.Tensor):
        t = item.to(torch.float32) / 255.0
    else:  # astype copies, so read-only (shared) arrays are fine
        t = torch.from_numpy(np.asarray(item).astype(np.float32)) / 255.0
    if image_size == 32 and t.shape == (28, 28):
        t = F.pad(t, (2, 2, 2, 2), value=0.0)
    elif tuple(t.shape) != (image_size, image_size):
        t = resize_float(t[None], image_size)[0].clamp(0.0, 1.0)
    return (t * 2.0 - 1.0).expand(3, image_size, image_size).contiguous()
