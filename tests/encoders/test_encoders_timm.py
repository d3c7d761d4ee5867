"""timm ViT encoders loaded from local files: explicit path, env/cache lookup, and one-line failures.

Real DINOv2/DINOv3/SigLIP2/MAE weights are not on this machine, so each test builds a tiny model of
the same architecture (small depth/width via ``model_kwargs``), saves its random weights, loads
them back through the public builder and compares with the source model's patch tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from manifold_lab.encoders import ENCODERS, TIMM_VITS, build_encoder
from manifold_lab.errors import CheckpointError, MissingWeightsError

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def _source(name: str, size: int, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {**TINY, **over}
    model = timm.create_model(TIMM_VITS[name].arch, pretrained=False, num_classes=0, img_size=size, **kw)
    with torch.no_grad():  # move the norms off their identity init so the affine part matters
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _expected(model: torch.nn.Module, images: torch.Tensor, size: int, grid: int, prefix: int,
              no_affine: bool = False) -> torch.Tensor:
    cfg = model.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = ((x + 1) / 2 - mean) / std
    with torch.no_grad():
        if no_affine:
            norm, model.norm = model.norm, torch.nn.Identity()
            tokens = F.layer_norm(model.forward_features(x), (model.num_features,), eps=norm.eps)
            model.norm = norm
        else:
            tokens = model.forward_features(x)
    patches = tokens[:, prefix:]
    return patches.reshape(images.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


@pytest.fixture()
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No weights anywhere: every lookup folder points into an empty temp dir."""
    monkeypatch.delenv("MANIFOLD_LAB_WEIGHTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.mark.parametrize("name,size,suffix", [
    ("dinov2_vitb14_reg", 56, ".safetensors"),
    ("dinov2_vits14", 28, ".pth"),
    ("dinov3_vits16plus", 32, ".safetensors"),
    ("siglip2_vitb16", 32, ".pth"),
    ("mae_vitb16", 48, ".safetensors"),
])
def test_explicit_file_matches_source_patch_tokens(tmp_path: Path, name: str, size: int, suffix: str) -> None:
    src = _source(name, size)
    path = _save(src, tmp_path / f"w{suffix}")
    enc = build_encoder(name, weights=path, input_size=size, model_kwargs=TINY)
    patch = TIMM_VITS[name].arch.split("patch")[1][:2]
    grid = size // int(patch)
    assert enc.grid_size == (grid, grid) and enc.embed_dim == 32 and enc.input_size == size
    assert enc.weights_path == str(path) and enc.name == name
    images = torch.rand(2, 3, 20, 24) * 2 - 1  # any input size: resized inside
    out = enc(images)
    assert out.shape == (2, 32, grid, grid)
    expected = _expected(src, images, size, grid, src.num_prefix_tokens)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_final_norm_without_affine(tmp_path: Path) -> None:
    src = _source("dinov2_vitl14_reg", 28)
    path = _save(src, tmp_path / "w.safetensors")
    enc = build_encoder("dinov2_vitl14_reg", weights=path, input_size=28, model_kwargs=TINY, final_norm_affine=False)
    images = torch.rand(3, 3, 28, 28) * 2 - 1
    out = enc(images)
    torch.testing.assert_close(out, _expected(src, images, 28, 2, 5, no_affine=True), rtol=1e-5, atol=1e-5)
    # every token is standardised over channels (no affine shift/scale left)
    assert out.mean(dim=1).abs().max() < 1e-4
    assert (out.var(dim=1, unbiased=False) - 1).abs().max() < 1e-3
    assert not torch.allclose(out, _expected(src, images, 28, 2, 5), atol=1e-3)  # the affine part mattered
    assert "norm-noaffine" in enc.identity()


def test_checkpoint_at_another_resolution_is_resampled(tmp_path: Path) -> None:
    """DINOv2 ships 37x37 position embeddings (518 px); they are resampled to the grid used here."""
    from timm.layers import resample_abs_pos_embed

    src = _source("dinov2_vitb14", 56)  # 4x4 grid in the file
    path = _save(src, tmp_path / "w.safetensors")
    enc = build_encoder("dinov2_vitb14", weights=path, input_size=28, model_kwargs=TINY)  # 2x2 grid
    assert enc.grid_size == (2, 2) and enc(torch.zeros(1, 3, 28, 28)).shape == (1, 32, 2, 2)
    want = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(2, 2), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(enc.model.pos_embed, want)
    torch.testing.assert_close(enc.model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_frozen_eval_and_optional_input_grad(tmp_path: Path) -> None:
    path = _save(_source("dinov2_vits14", 28), tmp_path / "w.safetensors")
    enc = build_encoder("dinov2_vits14", weights=path, input_size=28, model_kwargs=TINY)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    x = torch.rand(1, 3, 28, 28, requires_grad=True)
    assert not enc(x).requires_grad  # features are targets: no autograd by default
    enc_g = build_encoder("dinov2_vits14", weights=path, input_size=28, model_kwargs=TINY, input_grad=True)
    enc_g(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc_g.parameters())


def test_lookup_env_torch_hub_and_hf_cache(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, arch = "dinov2_vitb14", TIMM_VITS["dinov2_vitb14"].arch
    src = _source(name, 28)
    images = torch.rand(2, 3, 28, 28) * 2 - 1
    expected = _expected(src, images, 28, 2, 1)

    # 4. the Hugging Face hub cache layout timm uses
    hf = _save(src, clean_env / "hf" / f"models--timm--{arch}" / "snapshots" / "abc123" / "model.safetensors")
    enc = build_encoder(name, input_size=28, model_kwargs=TINY)
    assert enc.weights_path == str(hf)
    torch.testing.assert_close(enc(images), expected)

    # 3. torch hub's checkpoints dir (TORCH_HOME) wins over the HF cache
    hub = _save(src, clean_env / "torch" / "hub" / "checkpoints" / f"{arch}.pth")
    assert build_encoder(name, input_size=28, model_kwargs=TINY).weights_path == str(hub)

    # 1. $MANIFOLD_LAB_WEIGHTS wins over everything
    mine = _save(src, clean_env / "mine" / f"{name}.safetensors")
    monkeypatch.setenv("MANIFOLD_LAB_WEIGHTS", str(mine.parent))
    enc = build_encoder(name, input_size=28, model_kwargs=TINY)
    assert enc.weights_path == str(mine)
    torch.testing.assert_close(enc(images), expected)


def test_missing_weights_names_files_and_folders(clean_env: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        build_encoder("dinov2_vitl14_reg")
    msg = str(err.value)
    assert "\n" not in msg
    for needle in ("dinov2_vitl14_reg.safetensors", "dinov2_vitl14_reg4_pretrain.pth",
                   "vit_large_patch14_reg4_dinov2.lvd142m.safetensors", "MANIFOLD_LAB_WEIGHTS",
                   str(clean_env / "torch" / "hub" / "checkpoints")):
        assert needle in msg
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        build_encoder("dinov2_vits14", weights=clean_env / "nope.pth")


def test_mismatched_or_corrupt_file_is_checkpoint_error(tmp_path: Path) -> None:
    path = _save(_source("dinov2_vits14", 28, embed_dim=16), tmp_path / "narrow.safetensors")
    with pytest.raises(CheckpointError) as err:
        build_encoder("dinov2_vits14", weights=path, input_size=28, model_kwargs=TINY)
    assert str(path) in str(err.value) and "shape" in str(err.value) and "\n" not in str(err.value)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        build_encoder("dinov2_vits14", weights=broken, input_size=28, model_kwargs=TINY)


def test_registry_lists_every_encoder() -> None:
    assert set(ENCODERS.names()) >= {"mobilenet_v2", "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
                                     "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov3_vits16plus",
                                     "dinov3_vitb16", "siglip2_vitb16", "mae_vitb16"}
    for name in TIMM_VITS:
        assert timm.is_model(TIMM_VITS[name].arch.split(".")[0])
