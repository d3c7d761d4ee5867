"""Perceptual distances between images: LPIPS when its backbone is on disk, else a MobileNetV2 deep-feature distance.

LPC (the PAE paper's local perceptual continuity) and the tokenizers' reconstruction losses need a
perceptual distance P(x, y) -> one number per image pair, differentiable in the images.

* ``"lpips-alex"`` / ``"lpips-vgg"``: the ``lpips`` package's LPIPS v0.1 with its shipped linear
  heads. LPIPS also needs torchvision's ImageNet AlexNet / VGG16 backbone, which cannot be had
  offline; it is used only when ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` is already
  in torch hub's checkpoints folder (``torch.hub.get_dir()/checkpoints``). The file is checked for
  *before* LPIPS is constructed, because LPIPS would otherwise try to download it.
* ``"mobilenet-deep"``: an LPIPS-style distance from the embedded ImageNet MobileNetV2 (always
  present). Both images are resized to ``input_size`` (default 64: cheap on CPU and a 2x upsample
  of 32x32 images, so the stride-32 stage still has a 2x2 map), ImageNet-normalised, and features
  are taken after five stages (``features[:2]``, ``[:4]``, ``[:7]``, ``[:14]``, ``[:18]``: strides
  2, 4, 8, 16, 32). Per stage each spatial feature vector is unit-normalised over channels, the
  squared difference is summed over channels and averaged over positions; the five stage values
  are averaged with equal weights. This is LPIPS's recipe *without* its learned per-channel
  weights, so it is LPIPS-style but not LPIPS: its values are on another scale (per stage in
  [0, 4]) and must not be compared with LPIPS numbers.
* ``"auto"``: LPIPS-alex if its backbone file is present, else ``mobilenet-deep``.

Every result records ``distance.name`` (e.g. ``"lpips-alex"`` or ``"mobilenet-deep@64"``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from manifold_lab.encoders.mobilenet import load_mobilenet_v2
from manifold_lab.errors import CheckpointError, ManifoldLabError, MissingWeightsError

#: torchvision backbone file each LPIPS variant needs in torch hub's checkpoints folder.
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
#: MobileNetV2 ``features`` prefix lengths whose outputs the deep distance compares.
MOBILENET_TAPS = (2, 4, 7, 14, 18)
DISTANCE_NAMES = ("auto", "lpips-alex", "lpips-vgg", "mobilenet-deep")


class PerceptualDistance(nn.Module):
    """``forward(x, y) -> Tensor[B]`` for images in [-1, 1]; frozen weights, differentiable in the images."""

    name: str

    def train(self, mode: bool = True) -> "PerceptualDistance":
        return super().train(False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ManifoldLabError(
                f"perceptual distance {self.name} needs two image batches (B,3,H,W) of one shape, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )


def lpips_backbone_path(net: str) -> Path:
    """Where torchvision looks for the LPIPS backbone weights (whether or not the file exists)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


class LPIPSDistance(PerceptualDistance):
    """The ``lpips`` package's LPIPS (v0.1 linear heads) on a locally cached torchvision backbone."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in LPIPS_BACKBONE_FILES:
            raise ManifoldLabError(f"LPIPS net must be one of {', '.join(LPIPS_BACKBONE_FILES)}, got '{net}'")
        path = lpips_backbone_path(net)
        if not path.is_file():
            raise MissingWeightsError(
                f"LPIPS-{net} needs torchvision's ImageNet backbone {path.name} in {path.parent} (nothing is "
                "downloaded); copy it there, or use the 'mobilenet-deep' distance"
            )
        import lpips  # imported late: it pulls in torchvision's model zoo

        try:
            with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` interface
                warnings.simplefilter("ignore", UserWarning)
                self.lpips = lpips.LPIPS(net=net, version="0.1", verbose=False)
        except Exception as exc:  # a corrupt backbone file surfaces as various load errors
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise CheckpointError(
                f"LPIPS-{net} could not load {path} ({type(exc).__name__}: {first}); "
                "replace the file with torchvision's original"
            ) from exc
        self.name = f"lpips-{net}"
        self.weights_path = str(path)
        self._freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check(x, y)
        return self.lpips(x, y, normalize=False).reshape(x.shape[0])


class MobileNetDeepDistance(PerceptualDistance):
    """LPIPS-style distance on ImageNet MobileNetV2 features, without learned heads (see module doc)."""

    def __init__(self, input_size: int = 64, taps: tuple[int, ...] = MOBILENET_TAPS) -> None:
        super().__init__()
        if input_size < 32:
            raise ManifoldLabError(f"mobilenet-deep input_size must be >= 32, got {input_size}")
        taps = tuple(sorted(int(t) for t in taps))
        if not taps or taps[0] < 1 or taps[-1] > 19:
            raise ManifoldLabError(f"mobilenet-deep taps must lie in 1..19, got {taps}")
        model, path = load_mobilenet_v2()
        self.features = model.features[: taps[-1]]
        self.taps = taps
        self.input_size = int(input_size)
        self.name = f"mobilenet-deep@{self.input_size}"
        self.weights_path = str(path)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        h = ((x + 1) * 0.5 - self.pixel_mean) / self.pixel_std
        outs = []
        for i, block in enumerate(self.features, start=1):
            h = block(h)
            if i in self.taps:
                outs.append(h)
        return outs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check(x, y)
        b = x.shape[0]
        feats = self._stages(torch.cat([x, y]).to(self.pixel_mean.dtype))
        total = x.new_zeros(b, dtype=self.pixel_mean.dtype)
        for f in feats:
            f = f / (f.pow(2).sum(dim=1, keepdim=True).add(1e-10).sqrt())
            fx, fy = f[:b], f[b:]
            total = total + (fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total / len(feats)


def build_perceptual_distance(name: str = "auto", device: torch.device | str | None = None,
                              **kw) -> PerceptualDistance:
    """A frozen perceptual distance by name ("auto", "lpips-alex", "lpips-vgg", "mobilenet-deep")."""
    if name == "auto":
        name = "lpips-alex" if lpips_backbone_path("alex").is_file() else "mobilenet-deep"
    if name in ("lpips-alex", "lpips-vgg"):
        dist: PerceptualDistance = LPIPSDistance(name.split("-", 1)[1], **kw)
    elif name == "mobilenet-deep":
        dist = MobileNetDeepDistance(**kw)
    else:
        raise ManifoldLabError(f"unknown perceptual distance '{name}'; valid names: {', '.join(DISTANCE_NAMES)}")
    return dist.to(device) if device is not None else dist
