"""The RAE converter: a state dict GENERATED in the official layout (HF ViT-MAE decoder keys of RAE's
``GeneralDecoder``, stats file ``{"mean", "var"}``) for a tiny config lands tensor by tensor, decodes
like an independent re-implementation of the official forward, and bad files fail in one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from manifold_lab.errors import CheckpointError
from manifold_lab.tokenizers import load_tokenizer
from manifold_lab.tokenizers.convert import convert_checkpoint, get_converter
from manifold_lab.tokenizers.rae import RAE, mae_sincos_table

D, W, DEPTH, HEADS, MLP, PATCH, GRID = 96, 32, 2, 4, 48, 4, 8  # mobilenet_v2 tokens: 96 x 8 x 8
OPTS = dict(encoder="mobilenet_v2", encoder_input_size=None, num_heads=HEADS)


def mae_numpy_table(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed(add_cls_token=True), re-derived with numpy."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"decoder_embed.weight": r(W, D), "decoder_embed.bias": r(W),
          "decoder_pos_embed": torch.from_numpy(mae_numpy_table(W, GRID)).float().unsqueeze(0),
          "trainable_cls_token": r(1, 1, W),
          "decoder_norm.weight": 1 + r(W), "decoder_norm.bias": r(W),
          "decoder_pred.weight": r(PATCH * PATCH * 3, W), "decoder_pred.bias": r(PATCH * PATCH * 3)}
    for i in range(DEPTH):
        p = f"decoder_layers.{i}."
        for name in ("query", "key", "value"):
            sd[p + f"attention.attention.{name}.weight"] = r(W, W)
            sd[p + f"attention.attention.{name}.bias"] = r(W)
        sd.update({p + "attention.output.dense.weight": r(W, W), p + "attention.output.dense.bias": r(W),
                   p + "intermediate.dense.weight": r(MLP, W), p + "intermediate.dense.bias": r(MLP),
                   p + "output.dense.weight": r(W, MLP), p + "output.dense.bias": r(W),
                   p + "layernorm_before.weight": 1 + r(W), p + "layernorm_before.bias": r(W),
                   p + "layernorm_after.weight": 1 + r(W), p + "layernorm_after.bias": r(W)})
    return sd


def official_stats() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"mean": torch.randn(D, GRID, GRID, generator=g), "var": torch.rand(D, GRID, GRID, generator=g) + 0.5}


def official_decode(sd, stats, z, img_mean, img_std, eps=1e-12):
    """RAE.decode written independently from the official modules (eager attention, HF layer order)."""
    z = z * torch.sqrt(stats["var"] + 1e-5) + stats["mean"]
    b = z.shape[0]
    h = z.view(b, D, GRID * GRID).transpose(1, 2) @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    h = torch.cat([sd["trainable_cls_token"].expand(b, -1, -1), h], 1) + sd["decoder_pos_embed"]
    hd = W // HEADS
    for i in range(DEPTH):
        p = f"decoder_layers.{i}."
        lin = lambda t, n: t @ sd[p + n + ".weight"].T + sd[p + n + ".bias"]  # noqa: E731
        a = F.layer_norm(h, (W,), sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"], eps)
        q, k, v = (lin(a, f"attention.attention.{n}").view(b, -1, HEADS, hd).permute(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        h = lin(att.permute(0, 2, 1, 3).reshape(b, -1, W), "attention.output.dense") + h
        m = F.layer_norm(h, (W,), sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"], eps)
        h = lin(F.gelu(lin(m, "intermediate.dense")), "output.dense") + h
    h = F.layer_norm(h, (W,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps)
    out = (h @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    out = out.reshape(b, GRID, GRID, PATCH, PATCH, 3)
    x = torch.einsum("nhwpqc->nchpwq", out).reshape(b, 3, GRID * PATCH, GRID * PATCH)
    return (x * img_std + img_mean) * 2 - 1  # RAE's [0,1] output, then the [-1,1] convention


@pytest.fixture
def files(tmp_path):
    sd, st = official_state(), official_stats()
    torch.save(sd, tmp_path / "model.pt")
    torch.save(st, tmp_path / "stat.pt")
    return tmp_path, sd, st


def test_sincos_table_matches_mae() -> None:
    assert torch.allclose(mae_sincos_table(W, GRID), torch.from_numpy(mae_numpy_table(W, GRID)).float(), atol=1e-6)


def test_every_tensor_lands_where_it_should(files) -> None:
    folder, sd, st = files
    tok = get_converter("rae")(folder / "model.pt", stats=folder / "stat.pt", **OPTS)
    assert isinstance(tok, RAE) and tok.latent_shape == (D, GRID, GRID) and tok.image_size == GRID * PATCH
    assert tok.config.decoder_arch == "mae" and tok.config.decoder_ln_eps == 1e-12
    ours = tok.state_dict()
    from manifold_lab.tokenizers.convert.rae import key_map

    mapping = key_map(DEPTH)
    assert set(mapping) == set(sd)  # strict coverage of the official layout
    assert set(mapping.values()) | {"latent_mean", "latent_var", "latent_stats_images"} == set(ours)
    for src, dst in mapping.items():
        assert torch.equal(ours[dst], sd[src]), src
    assert torch.equal(ours["latent_mean"], st["mean"]) and torch.equal(ours["latent_var"], st["var"])
    assert tok.has_element_stats


def test_decodes_like_the_official_forward(files) -> None:
    folder, sd, st = files
    tok = get_converter("rae")(folder / "model.pt", stats=folder / "stat.pt", **OPTS)
    z = torch.randn(2, D, GRID, GRID, generator=torch.Generator().manual_seed(3))
    enc = tok.frozen("encoder")
    with torch.no_grad():
        ref = official_decode(sd, st, z, enc.pixel_mean, enc.pixel_std)
        assert torch.allclose(tok.decode(z), ref, atol=1e-4)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        assert torch.allclose(tok.encode(x), (enc(x) - st["mean"]) / torch.sqrt(st["var"] + 1e-5), atol=1e-5)


def test_convert_checkpoint_round_trip(files) -> None:
    folder, _, _ = files
    tok = convert_checkpoint("rae", folder / "model.pt", folder / "out", stats=folder / "stat.pt", **OPTS)
    back = load_tokenizer(folder / "out")
    z = torch.randn(1, D, GRID, GRID)
    with torch.no_grad():
        assert torch.equal(back.decode(z), tok.decode(z))


def test_wrapped_full_rae_state_dict_is_accepted(tmp_path) -> None:
    sd = official_state()
    torch.save({"ema": {f"decoder.{k}": v for k, v in sd.items()}, "model": {f"decoder.{k}": v for k, v in sd.items()}},
               tmp_path / "ckpt.pt")
    tok = get_converter("rae")(tmp_path / "ckpt.pt", **OPTS)
    assert torch.equal(tok.state_dict()["decoder.head.weight"], sd["decoder_pred.weight"])
    assert not tok.has_element_stats  # no stats file: identity normaliser


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "foreign", "stats_keys", "stats_shape", "encoder"])
def test_bad_files_fail_in_one_line(tmp_path, damage) -> None:
    sd, st = official_state(), official_stats()
    opts = dict(OPTS)
    if damage == "missing":
        del sd["decoder_layers.1.output.dense.bias"]
    elif damage == "unexpected":
        sd["decoder_layers.0.extra.weight"] = torch.zeros(3)
    elif damage == "shape":
        sd["decoder_layers.0.attention.attention.key.weight"] = torch.zeros(W, W + 1)
    elif damage == "foreign":
        sd = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)}
    elif damage == "stats_keys":
        st = {"mean": st["mean"], "std": st["var"]}
    elif damage == "stats_shape":
        st = {"mean": st["mean"][:, :4], "var": st["var"][:, :4]}
    elif damage == "encoder":
        opts["encoder_input_size"] = 64  # a 4x4 grid: not what the decoder was trained on
    torch.save(sd, tmp_path / "model.pt")
    torch.save(st, tmp_path / "stat.pt")
    with pytest.raises(CheckpointError) as info:
        get_converter("rae")(tmp_path / "model.pt", stats=tmp_path / "stat.pt", **opts)
    assert "\n" not in str(info.value)


def test_convert_tokenizer_command(files, tmp_path) -> None:
    """`manifold-lab convert-tokenizer rae SRC DST --option ...` writes a loadable tokenizer folder;
    a missing source file is one error line with exit code 2."""
    import subprocess
    import sys

    from manifold_lab.tokenizers import load_tokenizer

    folder, _, _ = files
    cmd = [sys.executable, "-m", "manifold_lab.cli", "convert-tokenizer", "rae", str(folder / "model.pt"),
           str(tmp_path / "converted"), "--option", f"stats={folder / 'stat.pt'}", "--option", "encoder=mobilenet_v2",
           "--option", "encoder_input_size=null", "--option", f"num_heads={HEADS}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "converted" in res.stdout and load_tokenizer(tmp_path / "converted").name == "rae"
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "nope.pt"), str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "not found" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
