"""One interface for every frozen vision encoder (the "VFM" that tokenizers align to).

Tokenizers (VA-VAE, RAE, SVG, PAE) and metrics only ever see images in [-1, 1] of any size going
in and a token grid (B, D, h, w) coming out. Each encoder's own input size and normalisation live
inside :meth:`FrozenEncoder.forward`, so a caller can never feed a DINOv2 un-normalised pixels or
the wrong resolution.

The encoder is frozen for good: its parameters never require grad and ``train()`` keeps it in eval
mode (dropout / batch-norm statistics stay fixed even inside a model that is being trained). Its
features are targets, so by default ``forward`` runs without autograd; ``input_grad=True`` lets
gradients flow back to the input image (the weights stay frozen) for losses that need it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab.encoders.weights import file_identity
from manifold_lab.errors import ManifoldLabError
from manifold_lab.registry import Registry

#: name -> factory(weights=None, **kw) -> FrozenEncoder. Third-party encoders: entry-point group.
ENCODERS: Registry["FrozenEncoder"] = Registry("encoder", entry_point_group="manifold_lab.encoders")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenEncoder(nn.Module):
    """Images (B,3,H,W) in [-1,1] -> token grid (B, embed_dim, *grid_size); frozen.

    Subclasses implement :meth:`encode_normalized` on an already resized and normalised batch.
    """

    def __init__(self, name: str, embed_dim: int, input_size: int, grid_size: tuple[int, int],
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 weights_path: str | None = None, input_grad: bool = False) -> None:
        super().__init__()
        self.name = name
        self.embed_dim = int(embed_dim)
        self.input_size = int(input_size)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.weights_path = None if weights_path is None else str(weights_path)
        self.input_grad = bool(input_grad)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> "FrozenEncoder":
        """Make every parameter non-trainable and switch to eval mode (call after building)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def __deepcopy__(self, memo: dict) -> "FrozenEncoder":
        # Immutable by construction: a deep copy of a model that holds it (an EMA copy) shares it.
        return self

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Always eval: a frozen encoder inside a training model must not change behaviour.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1,1] images of any size -> the encoder's input size (antialiased bilinear) and normalisation."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ManifoldLabError(
                f"encoder {self.name} takes images (B,3,H,W) in [-1,1], got shape {tuple(images.shape)}"
            )
        x = images.to(self.pixel_mean.dtype)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x + 1.0) * 0.5
        return (x - self.pixel_mean) / self.pixel_std

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.input_grad and torch.is_grad_enabled()):
            return self.encode_normalized(self.preprocess(images))

    def identity(self) -> str:
        """What produced these features: name, input size and weights content (for caches/results)."""
        return f"{self.name}@{self.input_size}|{file_identity(self.weights_path)}"

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, embed_dim={self.embed_dim}, input_size={self.input_size}, "
                f"grid_size={self.grid_size}, weights={self.weights_path!r}")
