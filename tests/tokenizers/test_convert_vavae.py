"""The LDM KL-VAE / VA-VAE converter, on state dicts generated with the official keys and shapes.

``ldm_state_dict`` builds random weights under LightningDiT's ``vavae/ldm`` AutoencoderKL names for a
small config; ``ldm_encode``/``ldm_decode`` re-implement that network's forward directly on the state
dict (bmm attention, bottom/right padded stride-2 convs, GroupNorm(32)), independently of our modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import manifold_lab.tokenizers.vavae as V
from manifold_lab.errors import CheckpointError
from manifold_lab.tokenizers.base import load_tokenizer
from manifold_lab.tokenizers.convert import convert_checkpoint, get_converter
from manifold_lab.tokenizers.convert.vavae import our_to_ldm, to_ldm_state_dict

CH, MULT, NRB, Z, VF = 32, (1, 2), 1, 4, 12
ATTN_LEVELS = (1,)  # LDM attn_resolutions [8] at resolution 16: the lowest level


def ldm_state_dict(seed: int = 0, with_vf: bool = True, extras: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.1

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin); conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout); conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    L = len(MULT)
    conv("encoder.conv_in", CH, 3, 3)
    block_in = CH
    for i in range(L):
        out = CH * MULT[i]
        for j in range(NRB):
            res(f"encoder.down.{i}.block.{j}", block_in, out)
            block_in = out
            if i in ATTN_LEVELS:
                attn(f"encoder.down.{i}.attn.{j}", out)
        if i != L - 1:
            conv(f"encoder.down.{i}.downsample.conv", out, out, 3)
    res("encoder.mid.block_1", block_in, block_in); attn("encoder.mid.attn_1", block_in)
    res("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in); conv("encoder.conv_out", 2 * Z, block_in, 3)
    conv("quant_conv", 2 * Z, 2 * Z, 1); conv("post_quant_conv", Z, Z, 1)
    block_in = CH * MULT[-1]
    conv("decoder.conv_in", block_in, Z, 3)
    res("decoder.mid.block_1", block_in, block_in); attn("decoder.mid.attn_1", block_in)
    res("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(L)):
        out = CH * MULT[i]
        for j in range(NRB + 1):
            res(f"decoder.up.{i}.block.{j}", block_in, out)
            block_in = out
            if i in ATTN_LEVELS:
                attn(f"decoder.up.{i}.attn.{j}", out)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", out, out, 3)
    norm("decoder.norm_out", block_in); conv("decoder.conv_out", 3, block_in, 3)
    if with_vf:
        sd["linear_proj.weight"] = torch.randn(VF, Z, 1, 1, generator=g)
    if extras:  # what a training checkpoint also holds: dropped by rule
        sd["loss.logvar"] = torch.zeros(())
        sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=g)
        sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3, generator=g)
        sd["foundation_model.model.cls_token"] = torch.randn(1, 1, 16, generator=g)
    return sd


# ---- direct functional re-implementation of the LDM forward, on the LDM state dict ----------------
def _gn(sd, name, h):
    return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _conv(sd, name, h, stride=1, padding=1):
    return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)


def _res(sd, name, x):
    h = _conv(sd, f"{name}.conv1", F.silu(_gn(sd, f"{name}.norm1", x)))
    h = _conv(sd, f"{name}.conv2", F.silu(_gn(sd, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{name}.nin_shortcut", x, padding=0)
    return x + h


def _attn(sd, name, x):
    h = _gn(sd, f"{name}.norm", x)
    q, k, v = (_conv(sd, f"{name}.{p}", h, padding=0) for p in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
    w = torch.softmax(w, dim=2)
    out = torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{name}.proj_out", out, padding=0)


def ldm_encode(sd, x):
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(len(MULT)):
        for j in range(NRB):
            h = _res(sd, f"encoder.down.{i}.block.{j}", h)
            if i in ATTN_LEVELS:
                h = _attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != len(MULT) - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _res(sd, "encoder.mid.block_2", _attn(sd, "encoder.mid.attn_1", _res(sd, "encoder.mid.block_1", h)))
    h = _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h)))
    return _conv(sd, "quant_conv", h, padding=0).chunk(2, dim=1)[0]  # posterior mean


def ldm_decode(sd, z):
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z, padding=0))
    h = _res(sd, "decoder.mid.block_2", _attn(sd, "decoder.mid.attn_1", _res(sd, "decoder.mid.block_1", h)))
    for i in reversed(range(len(MULT))):
        for j in range(NRB + 1):
            h = _res(sd, f"decoder.up.{i}.block.{j}", h)
            if i in ATTN_LEVELS:
                h = _attn(sd, f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)))


def _convert(sd, name="vavae", **kw):
    return get_converter(name)(sd, image_size=16, **kw)


# ---------------------------------------------------------------------------- tests
def test_config_inferred_from_shapes():
    model = _convert(ldm_state_dict())
    c = model.config
    assert (c.base_channels, c.ch_mult, c.num_res_blocks, c.z_channels) == (CH, MULT, NRB, Z)
    assert c.attn_stages == ATTN_LEVELS and c.downsample_padding == "ldm" and c.vf_dim == VF
    assert c.encoder == "dinov2_vitl14" and c.norm_groups == 32 and not c.vfm_imagenet_norm


def test_every_tensor_equals_its_source_and_round_trip_is_exact():
    sd = ldm_state_dict()
    model = _convert(sd)
    levels = len(MULT)
    for key, t in model.state_dict().items():
        src = our_to_ldm(key, levels)
        if isinstance(src, tuple):  # fused q, k, v
            want = torch.cat([sd[n].reshape(sd[n].shape[0], -1) if sd[n].ndim == 4 else sd[n] for n in src])
        else:
            want = sd[src].reshape(t.shape)
        assert torch.equal(t, want), key
    back = to_ldm_state_dict(model)
    kept = {k: v for k, v in sd.items() if not k.startswith(("loss.", "foundation_model."))}
    assert set(back) == set(kept)
    assert all(torch.equal(back[k], kept[k]) for k in kept)
    # and from our layout back again: identical state
    again = _convert(back)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_outputs_match_the_ldm_network():
    sd = ldm_state_dict()
    model = _convert(sd)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, Z, 8, 8)
        torch.testing.assert_close(z, ldm_encode(sd, x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.decode(z), ldm_decode(sd, z), rtol=1e-4, atol=1e-5)
        _, _, z_proj = model(x, sample=False)
        torch.testing.assert_close(z_proj, F.conv2d(z, sd["linear_proj.weight"]))


def test_vae_ldm_drops_projection_and_full_ldm_prefix():
    sd = ldm_state_dict()
    model = _convert({"first_stage_model." + k: v for k, v in sd.items()} | {"model.diffusion.w": torch.ones(1)},
                     name="vae-ldm")
    assert model.config.encoder is None and model.vf_proj is None and model.config.vf_weight == 0
    assert "vf_proj.weight" not in model.state_dict()
    with pytest.raises(CheckpointError, match="linear_proj"):
        _convert(ldm_state_dict(with_vf=False))  # 'vavae' needs the VF projection


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("decoder.up.0.block.1.conv2.bias"), "missing: decoder.up.0.block.1.conv2.bias"),
    (lambda sd: sd.update({"encoder.extra.weight": torch.ones(1)}), "unexpected: encoder.extra.weight"),
    (lambda sd: sd.update({"decoder.mid.attn_1.q.weight": torch.ones(64, 64, 3, 3)}), "shape mismatch"),
    (lambda sd: sd.update({"linear_proj.bias": torch.ones(VF)}), "reverse_proj=False"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("decoder.up.1.attn.")], "attention at encoder levels"),
])
def test_bad_checkpoints_one_line_errors(edit, match):
    sd = ldm_state_dict()
    edit(sd)
    with pytest.raises(CheckpointError, match=match) as info:
        _convert(sd)
    assert "\n" not in str(info.value)


def test_file_round_trip_with_latent_stats(tmp_path):
    sd = ldm_state_dict()
    src = tmp_path / "vavae-release.pt"
    torch.save({"state_dict": sd}, src)
    stats = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.arange(Z, dtype=torch.float32).view(1, Z, 1, 1),
                "std": torch.full((1, Z, 1, 1), 2.0)}, stats)
    model = convert_checkpoint("vavae", src, tmp_path / "out", image_size=16, latent_stats=stats)
    loaded = load_tokenizer(tmp_path / "out")
    assert isinstance(loaded, V.VAVAE)
    assert torch.equal(loaded.latent_stats.mean, torch.arange(Z, dtype=torch.float32))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        get_converter("vavae")(bad)
