"""LightningDiT mechanics: sizes, adaLN-Zero identity at init, attention variants, labels, FLOPs, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from manifold_lab.diffusion.model import (
    DIT_SIZES,
    DiTConfig,
    LightningDiT,
    axial_rope_table,
    dit_size_names,
)
from manifold_lab.errors import ConfigError, ManifoldLabError

NUM_CLASSES = 10


def tiny_cfg(**kw) -> DiTConfig:
    base = dict(size="T", depth=2, hidden_size=32, num_heads=2, head_width=48, head_heads=3)
    base.update(kw)
    return DiTConfig(**base)


def perturb(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Move every parameter off its init (zero-initialised adaLN / output layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def inputs(b: int = 3, c: int = 4, hw: tuple[int, int] = (4, 4), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, *hw, generator=g)
    t = torch.rand(b, generator=g)
    y = torch.arange(b) % (NUM_CLASSES + 1)  # includes the null label when b > NUM_CLASSES
    y[-1] = NUM_CLASSES
    return x, t, y


# -- config and sizes --------------------------------------------------------------------------------


def test_size_registry_and_config_resolution():
    assert dit_size_names() == sorted(["T", "S", "B", "L", "XL"])
    assert DIT_SIZES.build("T") == type(DIT_SIZES.build("T"))(6, 192, 3)
    expect = {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name, dims in expect.items():
        d = DiTConfig(size=name).dims()
        assert (d.depth, d.hidden_size, d.num_heads) == dims
    cfg = DiTConfig(size="S", depth=3)
    assert tuple(dataclasses.astuple(cfg.dims())) == (3, 384, 6)
    assert cfg.hidden_size is None  # unresolved fields stay None: a later size override keeps its meaning
    assert dataclasses.replace(cfg, size="B").dims().hidden_size == 768


def test_config_loads_with_overrides():
    from manifold_lab.config import load_config, to_dict

    cfg = load_config(DiTConfig, overrides=["size=B", "head_depth=2"], base=DiTConfig())
    assert cfg.dims().hidden_size == 768 and cfg.head_depth == 2
    assert to_dict(cfg)["depth"] is None


@pytest.mark.parametrize("kw, fragment", [
    (dict(size="XXL"), "valid sizes: B, L, S, T, XL"),
    (dict(hidden_size=192, num_heads=5), "not divisible"),
    (dict(hidden_size=24, num_heads=4), "multiple of 4 for 2-D RoPE"),  # head dim 6
    (dict(hidden_size=30, num_heads=1, rope=False), "multiple of 4"),  # sin-cos positions
    (dict(head_depth=1, head_width=100, head_heads=16), "dit.head_width=100 is not divisible"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(patch_size=0), "patch_size"),
])
def test_config_errors_are_one_line(kw, fragment):
    with pytest.raises(ConfigError) as err:
        DiTConfig(**kw)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_head_dim_6_is_fine_without_rope():
    model = LightningDiT(DiTConfig(hidden_size=24, num_heads=4, depth=1, rope=False), 2, 2, NUM_CLASSES)
    assert model.blocks[0].attn.head_dim == 6


def test_input_size_must_divide_by_patch():
    with pytest.raises(ManifoldLabError, match="divisible by patch_size=2"):
        LightningDiT(tiny_cfg(patch_size=2), 4, (4, 5), NUM_CLASSES)


@pytest.mark.parametrize("size", ["T", "S", "B", "L", "XL"])
@pytest.mark.parametrize("head_depth", [0, 2])
def test_every_size_builds_on_meta(size, head_depth):
    with torch.device("meta"):
        model = LightningDiT(DiTConfig(size=size, head_depth=head_depth), 32, 16, 1000)
    dims = model.cfg.dims()
    assert len(model.blocks) == dims.depth
    assert model.blocks[0].attn.head_dim == dims.hidden_size // dims.num_heads
    assert (model.head is not None) == (head_depth > 0)
    if head_depth:
        assert len(model.head.blocks) == head_depth and model.final_layer is None
    assert model.flops_per_sample() > 0
    if size == "XL" and head_depth == 0:  # LightningDiT-XL/1 on 32-channel latents: ~675M parameters
        assert 670e6 < model.num_params() < 680e6


def test_dit_dh_xl_param_count_matches_rae():
    """RAE reports 839M parameters for DiT^DH-XL (768-channel DINOv2-B latents, 16x16, patch 1)."""
    with torch.device("meta"):
        model = LightningDiT(DiTConfig(size="XL", head_depth=2, head_width=2048, head_heads=16), 768, 16, 1000)
    assert 830e6 < model.num_params() < 845e6


# -- forward ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, in_ch, hw", [
    (DiTConfig(size="T"), 4, (4, 4)),
    (DiTConfig(size="S"), 3, (2, 2)),
    (DiTConfig(size="T", patch_size=2), 4, (4, 6)),
    (DiTConfig(size="T", depth=1, patch_size=2, head_depth=1, head_width=64, head_heads=2), 4, (4, 6)),
    (tiny_cfg(depth=1, head_depth=2, rmsnorm=False, swiglu=False, qk_norm=False), 2, (3, 5)),
])
def test_forward_shapes(cfg, in_ch, hw):
    model = perturb(LightningDiT(cfg, in_ch, hw, NUM_CLASSES)).eval()
    x, t, y = inputs(2, in_ch, hw)
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("head_depth", [0, 2])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_identity_at_init_and_zero_output(head_depth, patch_size):
    model = LightningDiT(tiny_cfg(head_depth=head_depth, patch_size=patch_size), 4, (4, 4), NUM_CLASSES)
    seen = []

    def check(module, args, output):
        seen.append(torch.equal(output, args[0]))

    blocks = list(model.blocks) + (list(model.head.blocks) if model.head is not None else [])
    hooks = [b.register_forward_hook(check) for b in blocks]
    x, t, y = inputs()
    out = model.train()(x, t, y)
    for h in hooks:
        h.remove()
    assert seen == [True] * len(blocks)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("head_depth", [0, 1])
def test_fused_and_explicit_attention_agree(head_depth):
    cfg = tiny_cfg(head_depth=head_depth)
    fused = perturb(LightningDiT(cfg, 4, (4, 4), NUM_CLASSES)).eval()
    explicit = LightningDiT(dataclasses.replace(cfg, fused_attention=False), 4, (4, 4), NUM_CLASSES).eval()
    explicit.load_state_dict(fused.state_dict())
    x, t, y = inputs()
    a, b = fused(x, t, y), explicit(x, t, y)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rope_changes_output_with_same_weights():
    cfg = tiny_cfg()
    with_rope = perturb(LightningDiT(cfg, 4, (4, 4), NUM_CLASSES)).eval()
    no_rope = LightningDiT(dataclasses.replace(cfg, rope=False), 4, (4, 4), NUM_CLASSES).eval()
    no_rope.load_state_dict(with_rope.state_dict())  # RoPE adds no weights
    assert no_rope.rope is None and with_rope.rope.shape == (16, 2 * 16)
    x, t, y = inputs()
    assert (with_rope(x, t, y) - no_rope(x, t, y)).abs().max() > 1e-4


def test_rope_table_layout():
    """First half of the head dim rotates with the row, second half with the column; pairs share angles."""
    table = axial_rope_table((2, 3), 8)
    sin, cos = table.chunk(2, dim=-1)
    angles = torch.atan2(sin, cos).reshape(2, 3, 8)
    assert torch.equal(angles[..., 0::2], angles[..., 1::2])
    torch.testing.assert_close(angles[1, 0, :4], torch.tensor([1.0, 1.0, 0.01, 0.01]))  # row 1: freqs 1, 1e4^-0.5
    assert torch.all(angles[1, :, 4:] == angles[0, :, 4:])  # column part ignores the row
    torch.testing.assert_close(angles[0, 2, 4:], torch.tensor([2.0, 2.0, 0.02, 0.02]))
    # Rotation by a relative offset: <R(p) q, R(p') k> depends only on p - p' (per axis).
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    big = axial_rope_table((1, 6), 8)
    q, k = torch.randn(8), torch.randn(8)
    dots = [(apply_rot_embed_cat(q, big[i]) * apply_rot_embed_cat(k, big[i + 2])).sum() for i in range(4)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(4))


def test_qk_norm_normalises_each_head():
    model = perturb(LightningDiT(tiny_cfg(qk_norm=True), 4, (4, 4), NUM_CLASSES)).eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q_norm.weight.fill_(1.0)
    got = {}
    hook = attn.q_norm.register_forward_hook(lambda m, a, o: got.setdefault("q", o))
    model(*inputs())
    hook.remove()
    rms = got["q"].pow(2).mean(-1).sqrt()
    assert got["q"].shape[-1] == attn.head_dim
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    plain = LightningDiT(tiny_cfg(qk_norm=False), 4, (4, 4), NUM_CLASSES)
    assert not any("q_norm" in k for k in plain.state_dict())
    assert model.num_params() - plain.num_params() == 2 * 2 * attn.head_dim  # q and k weights, 2 blocks


def test_bf16_autocast_and_fullgraph_compile():
    model = perturb(LightningDiT(tiny_cfg(depth=1, head_depth=1), 4, (4, 4), NUM_CLASSES)).eval()
    x, t, y = inputs()
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, y)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fails on any graph break
    torch.testing.assert_close(compiled(x, t, y), ref)
    model.train()
    assert compiled(x, t, y).shape == x.shape  # training branch (class dropout) traces too


# -- labels and input checks -------------------------------------------------------------------------


def test_class_dropout_only_in_training():
    model = perturb(LightningDiT(tiny_cfg(class_dropout_prob=0.5), 4, (2, 2), NUM_CLASSES))
    n = 64
    x = torch.randn(1, 4, 2, 2).expand(n, -1, -1, -1).contiguous()
    t = torch.full((n,), 0.3)
    y = torch.full((n,), 3)
    model.eval()
    cond = model(x[:1], t[:1], y[:1])
    null = model(x[:1], t[:1], torch.tensor([NUM_CLASSES]))
    assert (cond - null).abs().max() > 1e-4
    torch.testing.assert_close(model(x, t, y), cond.expand(n, -1, -1, -1))  # eval: never dropped

    torch.manual_seed(0)
    out = model.train()(x, t, y)
    is_cond = torch.isclose(out, cond, atol=1e-5).flatten(1).all(1)
    is_null = torch.isclose(out, null, atol=1e-5).flatten(1).all(1)
    assert torch.all(is_cond ^ is_null)
    assert 10 < int(is_null.sum()) < 54  # ~Binomial(64, 0.5)


def test_label_embedder_force_drop_overrides_random():
    model = LightningDiT(tiny_cfg(class_dropout_prob=0.5), 4, (2, 2), NUM_CLASSES).train()
    emb = model.y_embedder
    y = torch.tensor([1, 2, 3])
    force = torch.tensor([False, True, False])
    expected = emb.embedding_table(torch.tensor([1, NUM_CLASSES, 3]))
    for _ in range(5):  # no randomness once force_drop is given
        assert torch.equal(emb(y, force), expected)
    no_drop = LightningDiT(tiny_cfg(class_dropout_prob=0.0), 4, (2, 2), NUM_CLASSES)
    assert no_drop.y_embedder.embedding_table.num_embeddings == NUM_CLASSES + 1  # null row always exists


@pytest.mark.parametrize("make, fragment", [
    (lambda x, t, y: (x, t, torch.tensor([0, 1, NUM_CLASSES + 1])), "must lie in"),
    (lambda x, t, y: (x, t, torch.tensor([0, -1, 2])), "must lie in"),
    (lambda x, t, y: (x, t, y.float()), "integer labels"),
    (lambda x, t, y: (x, t, y[:2]), "integer labels"),
    (lambda x, t, y: (x[:, :3], t, y), "shape (B, 4, 4, 4)"),
    (lambda x, t, y: (x[..., :2], t, y), "shape (B, 4, 4, 4)"),
    (lambda x, t, y: (x.long(), t, y), "float x"),
    (lambda x, t, y: (x, t[:, None], y), "float t"),
])
def test_bad_inputs_raise(make, fragment):
    model = LightningDiT(tiny_cfg(), 4, (4, 4), NUM_CLASSES)
    with pytest.raises(ManifoldLabError) as err:
        model(*make(*inputs()))
    assert fragment in str(err.value) and "\n" not in str(err.value)


# -- accounting and gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_kw", [
    dict(patch_size=1),
    dict(patch_size=2, swiglu=False, mlp_ratio=3.0),
    dict(patch_size=2, head_depth=2),
    dict(patch_size=1, head_depth=1, head_width=32, head_heads=2),  # no s projector
])
def test_flops_match_flop_counter(cfg_kw):
    cfg = tiny_cfg(fused_attention=False, **cfg_kw)  # CPU SDPA is not seen by FlopCounterMode
    model = LightningDiT(cfg, 4, (4, 6), NUM_CLASSES).eval()
    x, t, y = inputs(1, 4, (4, 6))
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    assert abs(counter.get_total_flops() - model.flops_per_sample()) <= 1e-3 * model.flops_per_sample()


def test_flops_hand_count():
    """depth 1, D 32, 2 heads, 4 channels on 2x2 (N 4), patch 1, SwiGLU hidden int(2/3*4*32) = 85."""
    model = LightningDiT(tiny_cfg(depth=1), 4, (2, 2), NUM_CLASSES)
    n, d, c, h = 4, 32, 4, 85
    block = 2 * n * (3 * d * d + d * d + 3 * d * h) + 2 * 6 * d * d + 4 * n * n * d
    hand = 2 * n * c * d + 2 * (256 * d + d * d) + block + 2 * 2 * d * d + 2 * n * d * c
    assert model.flops_per_sample() == hand


@pytest.mark.parametrize("head_depth", [0, 1])
def test_gradient_reaches_every_parameter(head_depth):
    model = perturb(LightningDiT(tiny_cfg(head_depth=head_depth), 4, (4, 4), NUM_CLASSES)).train()
    x, t, _ = inputs()
    y = torch.tensor([0, 1, 2])
    model(x, t, y).pow(2).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
