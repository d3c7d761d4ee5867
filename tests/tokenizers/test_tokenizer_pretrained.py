"""Recipes, latent statistics, train_tokenizer and the cached default checkpoint (get_pretrained)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from manifold_lab.errors import ConfigError, ManifoldLabError, MissingWeightsError
from manifold_lab.tokenizers import (TOKENIZERS, VAE, TokenizerSpec, VAEConfig, compute_latent_stats, get_pretrained,
                                     get_spec, load_recipe, load_tokenizer, pretrained_dir, train_tokenizer)
from manifold_lab.tokenizers import pretrained as pretrained_module
from manifold_lab.tokenizers.pretrained import cache_root, recipe_key

TINY_RECIPE = """\
tokenizer: vae
model: {image_size: 16, base_channels: 8, ch_mult: [1, 2], num_res_blocks: 1, norm_groups: 4, z_channels: 4}
train: {steps: 2, batch_size: 4, ckpt_every: 100, log_every: 1, tensorboard: false, device: cpu, ema_decay: 0.5,
        optim: {lr: 1.0e-3}}
data: {name: fashion-mnist, split: train, stats_images: 12, stats_batch_size: 8}
"""


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def test_default_recipe_is_valid() -> None:
    recipe = load_recipe("vae")
    assert isinstance(recipe.model, VAEConfig) and recipe.model == VAEConfig()  # config defaults = CPU recipe
    assert recipe.data.name == "fashion-mnist" and recipe.data.image_size == 32 and recipe.data.stats_images == 10_000


def test_recipe_validation(tiny_recipe, tmp_path) -> None:
    recipe = load_recipe("vae", tiny_recipe, ["train.steps=7", "model.z_channels=2"])
    assert recipe.train.steps == 7 and recipe.model.z_channels == 2 and recipe.data.image_size == 16
    assert recipe.train.optim.lr == pytest.approx(1e-3)
    cases = {
        "train.stpes=3": "train.stpes",
        "model.widht=3": "model.widht",
        "data.image_size=32": "differs from model.image_size",
        "tokenizer=other": "recipe for tokenizer 'other'",
        "extra.x=1": "unknown section extra",
    }
    for override, fragment in cases.items():
        with pytest.raises(ConfigError) as err:
            load_recipe("vae", tiny_recipe, [override])
        assert fragment in str(err.value) and "\n" not in str(err.value), override


class _ChannelPicker:
    """A stand-in tokenizer with a known latent: channels 0-1 of the image, scaled by 2 and shifted by 1."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] * 2.0 + 1.0


def test_compute_latent_stats_known_answer() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(50, 3, 4, 4, generator=g) * 2 - 1
    ds = TensorDataset(images, torch.zeros(50))
    stats = compute_latent_stats(_ChannelPicker(), ds, num_images=1000, batch_size=7)  # more than exist: all 50
    z = images[:, :2] * 2 + 1
    assert torch.allclose(stats.mean, z.transpose(0, 1).flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(stats.std, z.transpose(0, 1).flatten(1).std(1, unbiased=False), atol=1e-6)
    assert stats.how.startswith("per-channel mean/std of encode() latents over 50 images")
    # a subset: the first n of a seeded permutation
    sub = compute_latent_stats(_ChannelPicker(), ds, num_images=20, seed=3)
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:20]
    assert torch.allclose(sub.mean, (images[idx, :2] * 2 + 1).transpose(0, 1).flatten(1).mean(1), atol=1e-6)


def test_get_pretrained_trains_once_then_reuses(tiny_recipe, tmp_path, monkeypatch) -> None:
    calls = []
    real_train = pretrained_module.train_tokenizer

    def counting_train(*args, **kwargs):
        calls.append(args)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pretrained_module, "train_tokenizer", counting_train)
    cache = tmp_path / "cache"
    with pytest.raises(MissingWeightsError) as err:
        get_pretrained("vae", cache_dir=cache, train_if_missing=False, recipe=tiny_recipe)
    assert "python -m manifold_lab.tokenizers vae" in str(err.value) and "\n" not in str(err.value)
    assert calls == []

    first = get_pretrained("vae", cache_dir=cache, progress=False, recipe=tiny_recipe)
    assert len(calls) == 1
    folder = pretrained_dir("vae", cache, tiny_recipe)
    assert re.fullmatch(r"vae-[0-9a-f]{12}", folder.name) and folder.parent == cache / "checkpoints"
    assert (folder / "config.json").is_file() and (cache / "runs" / folder.name / "checkpoints").is_dir()
    assert isinstance(first, VAE) and first.latent_shape == (4, 8, 8) and not first.training
    assert "12 train images of fashion-mnist at 16x16" in first.latent_stats.how
    assert not torch.equal(first.latent_stats.std, torch.ones(4))  # real statistics, not the identity

    second = get_pretrained("vae", cache_dir=cache, progress=False, recipe=tiny_recipe)
    assert len(calls) == 1  # reused, not retrained
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(first.encode(x), second.encode(x))
    assert torch.equal(first.latent_stats.mean, second.latent_stats.mean)

    # the environment variable picks the same cache
    monkeypatch.setenv("MANIFOLD_LAB_CACHE", str(cache))
    assert cache_root() == cache
    get_pretrained("vae", progress=False, recipe=tiny_recipe)
    assert len(calls) == 1


def test_recipe_key_follows_contents_and_version(tiny_recipe, monkeypatch) -> None:
    key = recipe_key("vae", tiny_recipe)
    assert recipe_key("vae", tiny_recipe) == key
    tiny_recipe.write_text(TINY_RECIPE.replace("steps: 2", "steps: 3"))
    assert recipe_key("vae", tiny_recipe) != key
    changed = recipe_key("vae", tiny_recipe)
    import manifold_lab

    monkeypatch.setattr(manifold_lab, "__version__", "999.0")
    assert recipe_key("vae", tiny_recipe) != changed


def test_spec_with_own_weights_is_returned_as_is(monkeypatch) -> None:
    ready = VAE(VAEConfig(image_size=16, base_channels=8, ch_mult=(1, 2), norm_groups=4))
    spec = TokenizerSpec(name="ready-made", config_cls=VAEConfig, build=VAE, pretrained=lambda: ready)
    monkeypatch.setattr(TOKENIZERS, "_factories", {**TOKENIZERS._factories, "ready-made": spec})
    assert get_pretrained("ready-made") is ready
    with pytest.raises(ManifoldLabError, match="has no training loss"):
        train_tokenizer("ready-made")


def test_train_tokenizer_saves_and_resumes(tiny_recipe, tmp_path) -> None:
    run = tmp_path / "run"
    tok = train_tokenizer("vae", tiny_recipe, ["train.steps=1"], run_dir=run, progress=False)
    saved = load_tokenizer(run / "tokenizer")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(saved.encode(x), tok.encode(x))
    # the same command again finds the finished run and returns the same weights without training
    logged = (run / "metrics.jsonl").read_text()
    again = train_tokenizer("vae", tiny_recipe, ["train.steps=1"], run_dir=run, progress=False)
    with torch.no_grad():
        assert torch.equal(again.encode(x), tok.encode(x))
    assert (run / "metrics.jsonl").read_text() == logged
    assert get_spec("vae").loss is not None


def test_module_command_trains_and_prints_the_folder(tiny_recipe, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    assert pretrained_module.main(["vae", "--cache-dir", str(cache), "--recipe", str(tiny_recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(pretrained_dir("vae", cache, tiny_recipe)) and "latent_shape=(4, 8, 8)" in out[1]
    assert pretrained_module.main(["nope", "--cache-dir", str(cache)]) == 2
    err_line = capsys.readouterr().out.strip()
    assert err_line.startswith("error: unknown tokenizer 'nope'") and "\n" not in err_line
