"""Perceptual distances: the offline MobileNetV2 deep-feature distance and LPIPS on a local backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from manifold_lab.data import FashionMNIST
from manifold_lab.errors import CheckpointError, ManifoldLabError, MissingWeightsError
from manifold_lab.metrics.perceptual import build_perceptual_distance


@pytest.fixture()
def no_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    ds = FashionMNIST("test")
    return torch.stack([ds[i][0] for i in range(4)])


def test_auto_falls_back_to_mobilenet_deep(no_torch_hub: Path, images: torch.Tensor) -> None:
    dist = build_perceptual_distance("auto")
    assert dist.name == "mobilenet-deep@64"
    d = dist(images, images)
    assert d.shape == (4,) and d.abs().max() < 1e-6  # identical images -> 0


def test_grows_with_noise_and_is_symmetric(images: torch.Tensor) -> None:
    dist = build_perceptual_distance("mobilenet-deep")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    means = [dist(images, (images + s * noise).clamp(-1, 1)).mean().item() for s in (0.03, 0.2, 0.8)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    y = (images + 0.2 * noise).clamp(-1, 1)
    torch.testing.assert_close(dist(images, y), dist(y, images), rtol=1e-5, atol=1e-6)
    # a different garment is farther than a lightly noised copy of the same one
    assert dist(images[:2], images[2:]).mean() > means[0]
    assert build_perceptual_distance("mobilenet-deep", input_size=96).name == "mobilenet-deep@96"


def test_gradients_flow_to_images_only(images: torch.Tensor) -> None:
    dist = build_perceptual_distance("mobilenet-deep")
    x = (images[:2] * 0.9).requires_grad_(True)
    dist(x, images[:2]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in dist.parameters())
    dist.train()
    assert not any(m.training for m in dist.modules())


def _random_alexnet_file(folder: Path) -> Path:
    """A randomly initialised torchvision AlexNet state dict under torchvision's cache name.

    LPIPS uses only ``features``; the 58M classifier weights are stored as broadcast views of one
    value so the file stays ~10 MB (torch.save keeps the stride-0 view; loading copies it).
    """
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    small = {k: v if k.startswith("features") else v.flatten()[:1].clone().expand(v.shape) for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "alexnet-owt-7be5be79.pth"
    torch.save(small, path)
    return path


def test_lpips_alex_with_a_local_backbone(no_torch_hub: Path, images: torch.Tensor) -> None:
    path = _random_alexnet_file(no_torch_hub)
    dist = build_perceptual_distance("auto")  # the backbone file is there now: LPIPS is preferred
    assert dist.name == "lpips-alex" and dist.weights_path == str(path)
    alex = dist.lpips.net.slice1[0].weight
    assert torch.equal(alex, torch.load(path, weights_only=True)["features.0.weight"])  # our file was loaded
    y = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    d = dist(images, y)
    assert d.shape == (4,) and (d > 0).all() and dist(images, images).abs().max() < 1e-6
    x = images.clone().requires_grad_(True)
    dist(x, y).sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in dist.parameters())


def test_missing_lpips_backbone_is_named(no_torch_hub: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        build_perceptual_distance("lpips-vgg")
    assert "vgg16-397923af.pth" in str(err.value) and str(no_torch_hub) in str(err.value)
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        build_perceptual_distance("lpips-alex")
    no_torch_hub.mkdir(parents=True)
    (no_torch_hub / "alexnet-owt-7be5be79.pth").write_bytes(b"truncated download")
    with pytest.raises(CheckpointError, match="alexnet-owt-7be5be79.pth"):
        build_perceptual_distance("lpips-alex")
    with pytest.raises(ManifoldLabError, match="unknown perceptual distance 'ssim'"):
        build_perceptual_distance("ssim")
    with pytest.raises(ManifoldLabError, match="same shape|one shape"):
        build_perceptual_distance("mobilenet-deep")(torch.zeros(1, 3, 8, 8), torch.zeros(2, 3, 8, 8))
