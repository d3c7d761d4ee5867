"""Registry look-ups, build_tokenizer configs, and third-party discovery through real entry points."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from manifold_lab.errors import ConfigError, ManifoldLabError
from manifold_lab.tokenizers import (TOKENIZERS, VAE, Tokenizer, TokenizerSpec, VAEConfig, build_tokenizer,
                                     get_spec, list_tokenizers, load_tokenizer)


def test_builtin_vae_is_registered() -> None:
    assert "vae" in list_tokenizers()
    spec = get_spec("vae")
    assert isinstance(spec, TokenizerSpec) and spec.config_cls is VAEConfig and spec.loss is not None
    assert Path(spec.default_recipe).is_file()


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ManifoldLabError) as err:
        get_spec("vea")
    msg = str(err.value)
    assert "\n" not in msg and "unknown tokenizer 'vea'" in msg and "vae" in msg


def test_build_tokenizer_with_file_and_overrides(tmp_path) -> None:
    cfg = tmp_path / "model.yaml"
    cfg.write_text("image_size: 16\nbase_channels: 8\nch_mult: [1, 2]\nnorm_groups: 4\n")
    tok = build_tokenizer("vae", cfg, ["z_channels=6"])
    assert isinstance(tok, VAE) and tok.latent_shape == (6, 8, 8) and tok.config.base_channels == 8
    # a training recipe is accepted too: only its model section is used
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  image_size: 16\n  ch_mult: [1, 2, 2]\n  base_channels: 8\ntrain:\n  steps: 3\n")
    assert build_tokenizer("vae", recipe).latent_shape == (4, 4, 4)
    # defaults = the CPU recipe's model
    assert build_tokenizer("vae").latent_shape == (4, 8, 8)


def test_build_tokenizer_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError) as err:
        build_tokenizer("vae", overrides=["zchannels=8"])
    msg = str(err.value)
    assert "\n" not in msg and "zchannels" in msg and "z_channels" in msg and "base_channels" in msg


MYTOK = '''
from manifold_lab.tokenizers import TokenizerSpec, VAE, VAEConfig


class MyTok(VAE):
    """A third-party tokenizer (here a renamed VAE) shipped by another package."""

    name = "mytok"


def make_spec():
    return TokenizerSpec(name="mytok", config_cls=VAEConfig, build=MyTok, description="test tokenizer")


SPEC_OBJECT = TokenizerSpec(name="mytok-object", config_cls=VAEConfig, build=MyTok)
NOT_A_SPEC = 42
'''


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """A real installed-looking distribution 'mytok' (package + dist-info with entry_points.txt) on sys.path."""
    site = tmp_path / "site"
    (site / "mytok").mkdir(parents=True)
    (site / "mytok" / "__init__.py").write_text(MYTOK)
    info = site / "mytok-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mytok\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [manifold_lab.tokenizers]
        mytok = mytok:make_spec
        mytok-object = mytok:SPEC_OBJECT
        mytok-broken = mytok:NOT_A_SPEC
        mytok-missing = mytok_does_not_exist:spec
        alias = mytok:make_spec
        """))
    monkeypatch.syspath_prepend(str(site))
    # clear the registry's entry-point cache (restored after the test)
    monkeypatch.setattr(TOKENIZERS, "_factories", dict(TOKENIZERS._factories))
    monkeypatch.setattr(TOKENIZERS, "_entry_points_loaded", False)
    yield site
    sys.modules.pop("mytok", None)


def test_entry_point_discovery(fake_distribution, tmp_path) -> None:
    names = list_tokenizers()
    assert {"vae", "mytok", "mytok-object", "mytok-broken"} <= set(names)
    spec = get_spec("mytok")  # a zero-argument factory
    assert spec.name == "mytok" and spec.description == "test tokenizer"
    assert get_spec("mytok-object").name == "mytok-object"  # a TokenizerSpec object
    tok = build_tokenizer("mytok", overrides=["image_size=16", "base_channels=8", "ch_mult=[1,2]", "norm_groups=4"])
    assert isinstance(tok, Tokenizer) and tok.name == "mytok" and tok.latent_shape == (4, 8, 8)
    # its checkpoints load back through the entry point by name
    tok.save(tmp_path / "ck")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_tokenizer(tmp_path / "ck").encode(x), tok.eval().encode(x))


def test_broken_entry_points_fail_in_one_line(fake_distribution) -> None:
    with pytest.raises(ManifoldLabError) as err:
        get_spec("mytok-broken")
    assert "\n" not in str(err.value) and "not a TokenizerSpec" in str(err.value)
    with pytest.raises(ManifoldLabError) as err:
        get_spec("mytok-missing")
    assert "\n" not in str(err.value) and "failed to import" in str(err.value)
    with pytest.raises(ManifoldLabError) as err:
        get_spec("alias")  # the entry-point name and the spec's own name disagree
    assert "describes itself as 'mytok'" in str(err.value)
