"""The converter for the official PAE release, tested on state dicts GENERATED in the release's layout.

``release_state_dict`` writes every key of the release (``pae_with_generator/tokenizer/pae.py``,
``encoders.DeltaEncoder``, RAE's ``GeneralDecoder``) with the release's shapes for a tiny config;
``release_forward`` re-implements the release's inference forward from its code, reading that state
dict directly. The mapped weights must reproduce it in a release-layout model built from
manifold-lab's PAE pieces (``ReleaseLayoutPAE``: what ``PAEConfig``'s release switches must build),
and the real PAE must convert it or refuse with one CheckpointError line.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from manifold_lab.errors import CheckpointError
from manifold_lab.tokenizers.convert import get_converter
from manifold_lab.tokenizers.convert.pae import (
    channel_permutation,
    fold_input_normalization,
    fold_output_denormalization,
    inspect_release,
    mae_sincos_table,
    map_release_state_dict,
    read_release_state_dict,
)

D, C, HEADS = 32, 4, 4
DAM_DEPTH, DAM_MLP, DAM_IN, Q = 2, 64, 16, 4  # DAM: 16x16 input, 4-pixel patches -> 4x4 grid
DEC_W, DEC_DEPTH, DEC_MLP, DEC_HEADS, P = 24, 2, 40, 4, 2  # decoder: 2-pixel patches -> 8x8 image
GRID, IMG = DAM_IN // Q, (DAM_IN // Q) * P


def release_state_dict(seed: int = 0, layerscale: bool = True, dam: bool = True, d: int = D,
                       grid: int = GRID, q: int = Q, dam_mlp: int = DAM_MLP) -> dict[str, torch.Tensor]:
    """Every key of a release checkpoint, with the release's shapes, for the tiny config above."""
    D, GRID, Q, DAM_MLP = d, grid, q, dam_mlp  # noqa: N806 - shadow the module constants for this build
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd: dict[str, torch.Tensor] = {
        # the frozen VFM as the release stores it (skipped by the converter)
        "encoder.encoder.embeddings.cls_token": r(1, 1, D),
        "encoder.encoder.encoder.layer.0.norm1.weight": r(D),
    }
    if dam:
        sd["delta_encoder.patch_embed.proj.weight"] = r(D, 3, Q, Q)
        sd["delta_encoder.patch_embed.proj.bias"] = r(D)
        sd["delta_encoder.pos_embed"] = mae_sincos_table(D, GRID).unsqueeze(0)
        for i in range(DAM_DEPTH):
            s = f"delta_encoder.layers.{i}"
            for n in ("norm1", "norm2_q", "norm2_kv", "norm3"):
                sd[f"{s}.{n}.weight"] = 1 + r(D)
                sd[f"{s}.{n}.bias"] = r(D)
            sd[f"{s}.self_attn.qkv.weight"], sd[f"{s}.self_attn.qkv.bias"] = r(3 * D, D), r(3 * D)
            for n in ("self_attn.proj", "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.proj"):
                sd[f"{s}.{n}.weight"], sd[f"{s}.{n}.bias"] = r(D, D), r(D)
            sd[f"{s}.mlp.fc1.weight"], sd[f"{s}.mlp.fc1.bias"] = r(DAM_MLP, D), r(DAM_MLP)
            sd[f"{s}.mlp.fc2.weight"], sd[f"{s}.mlp.fc2.bias"] = r(D, DAM_MLP), r(D)
            if layerscale:
                for j in (1, 2, 3):
                    sd[f"{s}.ls{j}.gamma"] = 0.5 + r(D)
        sd["delta_encoder.fusion_proj.weight"], sd["delta_encoder.fusion_proj.bias"] = r(2 * D, D), r(2 * D)
        sd["delta_encoder.final_ln.weight"], sd["delta_encoder.final_ln.bias"] = 1 + r(D), r(D)
    sd["latent_compressor.0.qkv.weight"] = r(3 * D, D)  # timm Attention: qkv_bias=False by default
    sd["latent_compressor.0.proj.weight"], sd["latent_compressor.0.proj.bias"] = r(D, D), r(D)
    sd["latent_compressor.1.weight"], sd["latent_compressor.1.bias"] = r(C, D, 3, 3), r(C)
    sd["latent_decompressor.0.weight"], sd["latent_decompressor.0.bias"] = r(D, C, 3, 3), r(D)
    sd["latent_decompressor.1.qkv.weight"] = r(3 * D, D)
    sd["latent_decompressor.1.proj.weight"], sd["latent_decompressor.1.proj.bias"] = r(D, D), r(D)
    sd["decoder.decoder_embed.weight"], sd["decoder.decoder_embed.bias"] = r(DEC_W, D), r(DEC_W)
    pos = torch.cat([torch.zeros(1, DEC_W), mae_sincos_table(DEC_W, GRID)]).unsqueeze(0)
    sd["decoder.decoder_pos_embed"] = pos
    sd["decoder.trainable_cls_token"] = r(1, 1, DEC_W)
    for i in range(DEC_DEPTH):
        s = f"decoder.decoder_layers.{i}"
        for n in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense"):
            sd[f"{s}.{n}.weight"], sd[f"{s}.{n}.bias"] = r(DEC_W, DEC_W), r(DEC_W)
        sd[f"{s}.intermediate.dense.weight"], sd[f"{s}.intermediate.dense.bias"] = r(DEC_MLP, DEC_W), r(DEC_MLP)
        sd[f"{s}.output.dense.weight"], sd[f"{s}.output.dense.bias"] = r(DEC_W, DEC_MLP), r(DEC_W)
        for n in ("layernorm_before", "layernorm_after"):
            sd[f"{s}.{n}.weight"], sd[f"{s}.{n}.bias"] = 1 + r(DEC_W), r(DEC_W)
    sd["decoder.decoder_norm.weight"], sd["decoder.decoder_norm.bias"] = 1 + r(DEC_W), r(DEC_W)
    sd["decoder.decoder_pred.weight"], sd["decoder.decoder_pred.bias"] = r(P * P * 3, DEC_W), r(P * P * 3)
    return sd


# ---------------------------------------------------------------------------------------------
# the release's inference forward, written from its code (reads the release state dict directly)
# ---------------------------------------------------------------------------------------------
def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _ln(sd, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def _heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def _merge(x):
    b, h, n, e = x.shape
    return x.transpose(1, 2).reshape(b, n, h * e)


def _timm_attention(sd, name, x, heads):
    b, n, d = x.shape
    qkv = _lin(sd, name + ".qkv", x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    return _lin(sd, name + ".proj", _merge(F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])))


def release_encode(sd, x, feats):
    """x in [-1,1] (B,3,IMG,IMG), feats = the VFM tokens (B,D,GRID,GRID) -> the release's latent."""
    u = feats.flatten(2).transpose(1, 2)
    if any(k.startswith("delta_encoder.") for k in sd):
        x01 = (x + 1) / 2
        x01 = F.interpolate(x01, size=(DAM_IN, DAM_IN), mode="bicubic", align_corners=False)
        xn = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        t = F.conv2d(xn, sd["delta_encoder.patch_embed.proj.weight"], sd["delta_encoder.patch_embed.proj.bias"],
                     stride=Q).flatten(2).transpose(1, 2) + sd["delta_encoder.pos_embed"]
        for i in range(DAM_DEPTH):
            s = f"delta_encoder.layers.{i}"
            ls = [sd.get(f"{s}.ls{j}.gamma", torch.ones(D)) for j in (1, 2, 3)]
            a = _ln(sd, f"{s}.norm1", t, 1e-5)
            b, n, _ = a.shape
            qkv = _lin(sd, f"{s}.self_attn.qkv", a).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            t = t + ls[0] * _lin(sd, f"{s}.self_attn.proj", _merge(F.scaled_dot_product_attention(*qkv)))
            q = _heads(_lin(sd, f"{s}.cross_attn.q_proj", _ln(sd, f"{s}.norm2_q", t, 1e-5)), HEADS)
            ctx = _ln(sd, f"{s}.norm2_kv", u, 1e-5)
            k = _heads(_lin(sd, f"{s}.cross_attn.k_proj", ctx), HEADS)
            v = _heads(_lin(sd, f"{s}.cross_attn.v_proj", ctx), HEADS)
            t = t + ls[1] * _lin(sd, f"{s}.cross_attn.proj", _merge(F.scaled_dot_product_attention(q, k, v)))
            t = t + ls[2] * _lin(sd, f"{s}.mlp.fc2", F.gelu(_lin(sd, f"{s}.mlp.fc1", _ln(sd, f"{s}.norm3", t, 1e-5))))
        gamma, beta = _lin(sd, "delta_encoder.fusion_proj", t).chunk(2, dim=-1)
        u = _ln(sd, "delta_encoder.final_ln", u * (1 + gamma) + beta, 1e-5)
    z = _timm_attention(sd, "latent_compressor.0", u, HEADS)
    b, n, c = z.shape
    z = z.transpose(1, 2).reshape(b, c, GRID, GRID)
    z = F.conv2d(z, sd["latent_compressor.1.weight"], sd["latent_compressor.1.bias"], padding=1)
    return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-6)


def release_decode(sd, z):
    h = F.conv2d(z, sd["latent_decompressor.0.weight"], sd["latent_decompressor.0.bias"], padding=1)
    h = _timm_attention(sd, "latent_decompressor.1", h.flatten(2).transpose(1, 2), HEADS)
    x = _lin(sd, "decoder.decoder_embed", h)
    x = torch.cat([sd["decoder.trainable_cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd["decoder.decoder_pos_embed"]
    for i in range(DEC_DEPTH):
        s = f"decoder.decoder_layers.{i}"
        a = _ln(sd, f"{s}.layernorm_before", x, 1e-12)
        q, k, v = (_heads(_lin(sd, f"{s}.attention.attention.{n}", a), DEC_HEADS) for n in ("query", "key", "value"))
        x = x + _lin(sd, f"{s}.attention.output.dense", _merge(F.scaled_dot_product_attention(q, k, v)))
        x = x + _lin(sd, f"{s}.output.dense", F.gelu(_lin(sd, f"{s}.intermediate.dense",
                                                           _ln(sd, f"{s}.layernorm_after", x, 1e-12))))
    out = _lin(sd, "decoder.decoder_pred", _ln(sd, "decoder.decoder_norm", x, 1e-12))[:, 1:]
    b = out.shape[0]
    out = out.reshape(b, GRID, GRID, P, P, 3)
    img = torch.einsum("nhwpqc->nchpwq", out).reshape(b, 3, GRID * P, GRID * P)
    img01 = img * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return img01 * 2 - 1


# ---------------------------------------------------------------------------------------------
# a release-layout model from manifold-lab's PAE pieces (what PAEConfig's release switches build)
# ---------------------------------------------------------------------------------------------
class ReleaseLayoutPAE(nn.Module):
    def __init__(self, dam: bool = True) -> None:
        super().__init__()
        from timm.layers import Attention

        from manifold_lab.tokenizers.pae import PixelBranch
        from manifold_lab.tokenizers.rae import MAEStyleDecoder

        self.pixel = PixelBranch(3, Q, (GRID, GRID), D, D, DAM_DEPTH, HEADS, DAM_MLP / D)
        self.pixel.norm = nn.Identity()  # the release has no LayerNorm before the SFT projection
        self.sft = nn.Linear(D, 2 * D)
        self.sft_norm = nn.LayerNorm(D, eps=1e-5)
        self.compressor = nn.ModuleList([Attention(D, num_heads=HEADS)])
        self.to_latent = nn.Conv2d(D, C, 3, padding=1)
        self.from_latent = nn.Conv2d(C, D, 3, padding=1)
        self.decompressor = nn.ModuleList([Attention(D, num_heads=HEADS)])
        self.decoder = MAEStyleDecoder(D, (GRID, GRID), P, DEC_W, DEC_DEPTH, DEC_HEADS, DEC_MLP, 1e-12)

    def encode(self, x, feats):
        f = feats.flatten(2).transpose(1, 2)
        xd = F.interpolate(x, size=(DAM_IN, DAM_IN), mode="bicubic", align_corners=False)
        gamma, beta = self.sft(self.pixel(xd, f)).chunk(2, dim=-1)
        h = self.sft_norm(f * (1 + gamma) + beta)
        z = self.compressor[0](h).transpose(1, 2).reshape(x.shape[0], D, GRID, GRID)
        z = self.to_latent(z)
        return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-6)

    def decode(self, z):
        h = self.decompressor[0](self.from_latent(z).flatten(2).transpose(1, 2))
        return self.decoder(h.transpose(1, 2).reshape(z.shape[0], D, GRID, GRID))


def _inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, IMG, IMG, generator=g) * 2 - 1
    feats = F.layer_norm(torch.randn(2, GRID, GRID, D, generator=g), (D,)).permute(0, 3, 1, 2)
    return x, feats


@pytest.mark.parametrize("layerscale", [True, False])
def test_mapped_weights_reproduce_the_release_forward(tmp_path, layerscale):
    sd = release_state_dict(layerscale=layerscale)
    # saved as the release does: {"model": state_dict} with DDP/compile prefixes
    path = tmp_path / "dinov2-large.pt"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, path)
    loaded = read_release_state_dict(path)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)

    model = ReleaseLayoutPAE()
    state = map_release_state_dict(loaded, model)
    model.load_state_dict(state, strict=True)
    x, feats = _inputs()
    with torch.no_grad():
        z_ref, z = release_encode(sd, x, feats), model.encode(x, feats)
        assert z.shape == (2, C, GRID, GRID)
        assert torch.allclose(z, z_ref, atol=2e-4), (z - z_ref).abs().max()
        x_ref, x_rec = release_decode(sd, z_ref), model.decode(z_ref)
        assert x_rec.shape == (2, 3, IMG, IMG)
        assert torch.allclose(x_rec, x_ref, atol=1e-4), (x_rec - x_ref).abs().max()

    # tensors that are moved unchanged land bit-exactly where they should
    assert torch.equal(state["to_latent.weight"], sd["latent_compressor.1.weight"])
    assert torch.equal(state["compressor.0.qkv.weight"], sd["latent_compressor.0.qkv.weight"])
    assert torch.equal(state["decoder.blocks.1.k.weight"], sd["decoder.decoder_layers.1.attention.attention.key.weight"])
    assert torch.equal(state["decoder.cls_token"], sd["decoder.trainable_cls_token"])
    assert torch.equal(state["sft_norm.weight"], sd["delta_encoder.final_ln.weight"])
    assert torch.equal(state["pixel.blocks.0.cross.kv.weight"][D:], sd["delta_encoder.layers.0.cross_attn.v_proj.weight"])


def test_release_without_dam_converts_to_a_zero_sft(tmp_path):
    sd = release_state_dict(dam=False)
    layout = inspect_release(sd)
    assert not layout.has_dam and layout.dam_depth == 0
    model = ReleaseLayoutPAE()
    state = map_release_state_dict(sd, model)
    assert not state["sft.weight"].any() and not state["sft.bias"].any()


def test_inspect_release_reads_the_architecture():
    lay = inspect_release(release_state_dict())
    assert (lay.vfm_dim, lay.z_channels, lay.dam_depth, lay.dam_patch, lay.dam_mlp) == (D, C, DAM_DEPTH, Q, DAM_MLP)
    assert (lay.decoder_width, lay.decoder_depth, lay.decoder_mlp, lay.decoder_patch, lay.grid) == \
        (DEC_W, DEC_DEPTH, DEC_MLP, P, GRID)
    assert lay.fusion_mode == "sft" and lay.dam_cross and lay.dam_layerscale and not lay.compressor_qkv_bias


def test_sincos_tables_differ_by_a_channel_permutation():
    from manifold_lab.nn.vit import sincos_pos_embed

    ours, theirs = sincos_pos_embed((GRID, GRID), D).float(), mae_sincos_table(D, GRID)
    perm = channel_permutation(ours, theirs)
    assert perm is not None and torch.allclose(ours, theirs[:, perm], atol=1e-6)
    assert channel_permutation(ours, torch.randn_like(theirs)) is None


def test_folds_are_exact_affine_rewrites():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, generator=g)
    x = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = F.conv2d(((x + 1) / 2 - mean) / std, w, b, stride=2)
    w2, b2 = fold_input_normalization(w, b)
    assert torch.allclose(F.conv2d(x, w2, b2, stride=2), ref, atol=1e-5)
    hw, hb = torch.randn(12, 7, generator=g), torch.randn(12, generator=g)
    h = torch.randn(3, 7, generator=g)
    out = F.linear(h, hw, hb).view(3, 2, 2, 3)  # (p, q, c), c last
    ref = (out * std.view(1, 1, 1, 3) + mean.view(1, 1, 1, 3)) * 2 - 1
    hw2, hb2 = fold_output_denormalization(hw, hb)
    assert torch.allclose(F.linear(h, hw2, hb2).view(3, 2, 2, 3), ref, atol=1e-5)


def test_wrong_or_mismatched_files_fail_with_one_line(tmp_path):
    model = ReleaseLayoutPAE()
    sd = release_state_dict()
    for broken, needle in (
        ({k: v for k, v in sd.items() if k != "decoder.decoder_layers.1.output.dense.bias"}, "lacks"),
        ({**sd, "decoder.extra_head.weight": torch.zeros(1)}, "does not know"),
        ({**sd, "latent_compressor.1.weight": torch.zeros(C, D + 1, 3, 3)}, "D="),
        ({k: v for k, v in sd.items() if not k.startswith("latent_compressor.")}, "missing"),
    ):
        with pytest.raises(CheckpointError) as err:
            map_release_state_dict(broken, model)
        assert needle in str(err.value) and "\n" not in str(err.value)
    other = dict(sd)
    other["decoder.decoder_pred.weight"] = torch.zeros(5, DEC_W)
    with pytest.raises(CheckpointError):
        map_release_state_dict(other, model)

    # not a state dict / not readable with weights_only
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        read_release_state_dict(tmp_path / "junk.pt")
    torch.save({"model": {"a": torch.zeros(1)}, "args": {"lr": 1}}, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="not a PAE release checkpoint"):
        inspect_release(read_release_state_dict(tmp_path / "tiny.pt"))
    with pytest.raises(CheckpointError):
        read_release_state_dict(tmp_path / "absent.pt")


def _pae_supports_release() -> bool:
    import dataclasses

    from manifold_lab.tokenizers.pae import PAEConfig

    names = {f.name for f in dataclasses.fields(PAEConfig)}
    return {"compressor_arch", "dam_final_norm", "sft_norm_affine", "dam_input_size", "decoder_arch"} <= names


def test_release_dam_and_compressor_land_in_the_real_pae(tmp_path):
    """Against the real PAE (MobileNetV2 VFM: D=96, 8x8 grid at 128 px, i.e. 16-pixel 'VFM patches'):
    every DAM, fusion and compressor tensor of the release finds its place; the decoder then either
    converts too or is refused in one line naming ``decoder_arch``."""
    import manifold_lab.tokenizers.pae  # noqa: F401  (registers "pae")

    # DAM MLP ratio = decoder MLP ratio (40/24), so a PAE with one mlp_ratio can build it
    sd = release_state_dict(seed=2, d=96, grid=8, q=16, dam_mlp=160)
    path = tmp_path / "release.pt"
    torch.save({"model": sd}, path)
    opts = dict(encoder="mobilenet_v2", encoder_input_size=128, image_size=8 * P, heads=4, decoder_heads=4)
    try:
        model = get_converter("pae")(path, **opts)
    except CheckpointError as exc:
        assert "decoder_arch" in str(exc) and "\n" not in str(exc), str(exc)
    else:
        assert model.latent_shape == (C, 8, 8)


def test_current_pae_converts_or_names_what_it_lacks(tmp_path):
    """A release-layout file at the embedded MobileNetV2's size (D=96, 8x8 grid): the real PAE either
    holds it (and is returned in eval mode) or conversion stops with one line naming the missing switch."""
    import manifold_lab.tokenizers.pae  # noqa: F401  (registers "pae")

    sd = release_state_dict(seed=1, d=96, grid=8, q=16)  # DAM patch = the VFM stride at its 128-px input
    path = tmp_path / "release.pt"
    torch.save({"model": sd}, path)
    convert = get_converter("pae")
    opts = dict(encoder="mobilenet_v2", encoder_input_size=128, image_size=8 * P, heads=4, decoder_heads=4)
    if not _pae_supports_release():
        with pytest.raises(CheckpointError) as err:
            convert(path, **opts)
        msg = str(err.value)
        assert "\n" not in msg and "needs PAEConfig" in msg, msg
    else:  # runs once PAE offers the release switches
        model = convert(path, **opts)
        assert model.latent_shape == (C, 8, 8) and not model.training


def test_real_pae_encoder_half_matches_the_release_forward(monkeypatch):
    """The real PAE built by ``release_config`` (release switches on) with the mapped DAM, fusion and
    compressor weights encodes exactly as the release does (LayerNorm eps 1e-6 vs the release's 1e-5
    in the DAM blocks is the only difference). The decoder goes through a stand-in until PAE offers
    the release's ViT-MAE decoder."""
    import sys

    from manifold_lab.tokenizers.convert.pae import release_config
    from manifold_lab.tokenizers.pae import PAE
    from manifold_lab.tokenizers.rae import MAEStyleDecoder

    sd = release_state_dict(seed=2, d=96, grid=8, q=16, dam_mlp=160)
    cfg = release_config(inspect_release(sd), encoder="mobilenet_v2", encoder_input_size=128, image_size=8 * P,
                         heads=4, decoder_heads=4)
    model = PAE(cfg).eval()
    dec = MAEStyleDecoder(96, (8, 8), P, DEC_W, DEC_DEPTH, DEC_HEADS, DEC_MLP, 1e-12)

    class WithReleaseDecoder:  # the real PAE's tensors, with the release decoder's names for "decoder."
        pixel = model.pixel

        def state_dict(self):
            out = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
            out.update({"decoder." + k: v for k, v in dec.state_dict().items()})
            return out

    state = map_release_state_dict(sd, WithReleaseDecoder())
    result = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("decoder.")}, strict=False)
    assert not result.unexpected_keys and all(k.startswith("decoder.") for k in result.missing_keys)
    here = sys.modules[__name__]
    for name, value in dict(D=96, GRID=8, Q=16, DAM_IN=128, DAM_MLP=160).items():
        monkeypatch.setattr(here, name, value)
    x = torch.rand(2, 3, 8 * P, 8 * P, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z, z_ref = model.encode(x), release_encode(sd, x, model.frozen_features(x))
    assert torch.allclose(z, z_ref, atol=2e-4), (z - z_ref).abs().max()
