"""save() / load_tokenizer(): bit-exact round trips and one-line errors for every broken input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from manifold_lab.errors import CheckpointError, ManifoldLabError
from manifold_lab.tokenizers import VAE, LatentStats, Tokenizer, load_tokenizer
from manifold_lab.tokenizers.base import STATS_PREFIX
from manifold_lab.io import load_tensors

from tokenizer_helpers import tiny_config


@pytest.fixture
def saved(tmp_path, tiny_vae) -> tuple[Path, VAE]:
    tiny_vae.set_latent_stats(LatentStats(torch.tensor([0.1, 0.2, -0.3, 1.5]), torch.tensor([1.0, 2.0, 0.5, 3.0]),
                                          "per-channel mean/std set by hand for a test"))
    folder = tmp_path / "tok"
    tiny_vae.save(folder)
    return folder, tiny_vae


def _one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


def test_round_trip_is_bit_exact(saved, images) -> None:
    folder, original = saved
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, Tokenizer) and isinstance(loaded, VAE)
    assert loaded.config == original.config and not loaded.training
    for k, v in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), original.encode(images))
        z = original.encode(images)
        assert torch.equal(loaded.decode(z), original.decode(z))
    assert torch.equal(loaded.latent_stats.mean, original.latent_stats.mean)
    assert torch.equal(loaded.latent_stats.std, original.latent_stats.std)
    assert loaded.latent_stats.how == original.latent_stats.how
    # the weights file or config.json path works as well as the folder
    for path in (folder / "model.safetensors", folder / "config.json"):
        again = load_tokenizer(path)
        with torch.no_grad():
            assert torch.equal(again.encode(images), original.encode(images))


def test_saved_files_follow_the_documented_format(saved) -> None:
    folder, original = saved
    meta = json.loads((folder / "config.json").read_text())
    assert meta["tokenizer"] == "vae" and meta["format"] == "manifold-lab-tokenizer"
    assert meta["image_size"] == 16 and meta["latent_shape"] == [4, 8, 8]
    assert meta["config"]["ch_mult"] == [1, 2] and meta["config"]["base_channels"] == 8
    assert meta["latent_stats"]["how"].startswith("per-channel")
    assert meta["latent_stats"]["std"] == pytest.approx([1.0, 2.0, 0.5, 3.0])
    assert "manifold_lab_version" in meta
    tensors = load_tensors(folder / "model.safetensors")
    assert torch.equal(tensors[STATS_PREFIX + "mean"], original.latent_stats.mean)
    assert set(tensors) - {STATS_PREFIX + "mean", STATS_PREFIX + "std"} == set(original.state_dict())


def test_missing_folder_and_files(tmp_path, saved) -> None:
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path / "nowhere")
    assert "not found" in _one_line_error(err) and "nowhere" in str(err.value)
    folder, _ = saved
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    assert "has no config.json" in _one_line_error(err)


def test_corrupt_safetensors(saved) -> None:
    folder, _ = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    assert "corrupt" in _one_line_error(err) and str(weights) in str(err.value)


def test_corrupt_config_json(saved) -> None:
    folder, _ = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    assert "not valid JSON" in _one_line_error(err)


def test_unknown_tokenizer_name(saved) -> None:
    folder, _ = saved
    meta = json.loads((folder / "config.json").read_text())
    meta["tokenizer"] = "no-such-tok"
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    msg = _one_line_error(err)
    assert "'no-such-tok'" in msg and "vae" in msg  # the valid names are listed


def test_mismatched_shapes(saved) -> None:
    folder, _ = saved
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["base_channels"] = 12  # same keys, other widths
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    msg = _one_line_error(err)
    assert "shape mismatch" in msg and "decoder.conv_in.bias (16,) in file vs (24,) in model" in msg


def test_missing_and_unexpected_keys(saved) -> None:
    folder, _ = saved
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["mid_attention"] = False  # the file has attention weights the model lacks
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    assert "unexpected keys: decoder.mid.attn" in _one_line_error(err)


def test_config_key_unknown_to_the_tokenizer(saved) -> None:
    folder, _ = saved
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["widht"] = 3
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ManifoldLabError) as err:
        load_tokenizer(folder)
    msg = _one_line_error(err)
    assert "widht" in msg and "base_channels" in msg  # valid keys listed


def test_missing_latent_stats(saved, tmp_path) -> None:
    folder, original = saved
    from manifold_lab.io import save_tensors

    save_tensors(folder / "model.safetensors", original.state_dict())
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    assert "latent statistics" in _one_line_error(err)


def test_save_overwrites_in_place(tmp_path, images) -> None:
    torch.manual_seed(3)
    a, b = VAE(tiny_config()), VAE(tiny_config())
    a.save(tmp_path / "t")
    b.save(tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(load_tokenizer(tmp_path / "t").encode(images), b.encode(images))
