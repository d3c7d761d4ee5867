"""VA-VAE: the VF loss mechanics (margins, zero at alignment, adaptive weight), training, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import manifold_lab.tokenizers.vavae as V
from manifold_lab.encoders.base import FrozenEncoder
from manifold_lab.errors import ConfigError
from manifold_lab.tokenizers.base import load_tokenizer

D = 12  # stub VFM width


class StubVFM(FrozenEncoder):
    """A fixed random 'VFM': [-1,1] images -> (B, D, 4, 4) (grid smaller than the latent's)."""

    def __init__(self) -> None:
        super().__init__("stub", embed_dim=D, input_size=16, grid_size=(4, 4))
        g = torch.Generator().manual_seed(1)
        self.register_buffer("w", torch.randn(D, 3, 4, 4, generator=g))

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, stride=4)


def tiny_config(**kw) -> V.VAVAEConfig:
    base = dict(image_size=16, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4,
                encoder="stub", vf_dim=D, vf_weight=0.5)
    base.update(kw)
    return V.VAVAEConfig(**base)


def tiny_model(**kw) -> V.VAVAE:
    torch.manual_seed(0)
    model = V.VAVAE(tiny_config(**kw))
    model.attach_frozen("vfm", StubVFM())
    return model


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------- VF loss terms
def test_vf_loss_is_zero_when_projection_equals_features():
    f = torch.randn(2, D, 4, 4, generator=torch.Generator().manual_seed(0))
    for p in (f.clone(), 3.0 * f):  # equal tokens, or equal up to a positive scale: same cosines
        distmat, cos = V.vf_loss_terms(p, f, m_dist=0.25, m_cos=0.5)
        assert distmat.item() == 0.0 and cos.item() == 0.0
    # even without margins the distance-matrix term vanishes exactly and the cosine term to rounding
    distmat, cos = V.vf_loss_terms(f.clone(), f, m_dist=0.0, m_cos=0.0)
    assert distmat.item() == 0.0 and cos.item() < 1e-6


def test_vf_loss_margins_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    f = torch.stack([e1, e1], 1).view(1, 2, 1, 2)  # tokens e1, e1: pair cosine 1
    p = torch.stack([e1, e2], 1).view(1, 2, 1, 2)  # tokens e1, e2: pair cosine 0
    # |dcos| = [[0, 1], [1, 0]]; per-token cos(f_i, p_i) = [1, 0]
    for m_dist, want in ((0.0, 0.5), (0.25, 0.375), (1.0, 0.0)):
        assert V.vf_loss_terms(p, f, m_dist, 0.5)[0].item() == pytest.approx(want)
    for m_cos, want in ((0.0, 0.5), (0.5, 0.25), (1.0, 0.0)):
        assert V.vf_loss_terms(p, f, 0.25, m_cos)[1].item() == pytest.approx(want)


def test_vf_loss_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    p, f = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    m_dist, m_cos = 0.1, 0.3
    dist_terms, cos_terms = [], []
    for b in range(2):
        pt, ft = p[b].flatten(1).T, f[b].flatten(1).T  # (N, D)
        for i in range(9):
            cos_terms.append(max(0.0, 1 - m_cos - F.cosine_similarity(ft[i], pt[i], dim=0).item()))
            for j in range(9):
                d = abs(F.cosine_similarity(pt[i], pt[j], dim=0).item() - F.cosine_similarity(ft[i], ft[j], dim=0).item())
                dist_terms.append(max(0.0, d - m_dist))
    distmat, cos = V.vf_loss_terms(p, f, m_dist, m_cos)
    assert distmat.item() == pytest.approx(sum(dist_terms) / len(dist_terms), abs=1e-6)
    assert cos.item() == pytest.approx(sum(cos_terms) / len(cos_terms), abs=1e-6)


def test_criterion_vf_terms_zero_when_projected_latent_is_the_target():
    """Whole path: posterior variance ~0 and a 'VFM' returning vf_proj(mean) -> both VF terms are 0."""
    model = tiny_model()
    with torch.no_grad():  # logvar channels of quant_conv -> constant -30 (std 3e-7): the sample is the mean
        zc = model.z_channels
        model.quant_conv.weight[zc:].zero_()
        model.quant_conv.bias[zc:].fill_(-100.0)

    class Aligned(FrozenEncoder):
        def __init__(self) -> None:
            super().__init__("aligned", embed_dim=D, input_size=16, grid_size=(8, 8))

        def forward(self, x):  # bypass preprocessing: the target is the projected posterior mean itself
            with torch.no_grad():
                return model.vf_proj(model.encode(x))

    model.attach_frozen("vfm", Aligned())
    crit = V.VAVAECriterion(model.config)
    loss, logs = crit(model, images(), 0)
    assert logs["vf_distmat"].item() == 0.0 and logs["vf_cos"].item() == 0.0 and logs["vf"].item() == 0.0
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------- adaptive weight
def test_adaptive_weight_matches_hand_computation():
    model = tiny_model(vf_weight=0.3)
    crit = V.VAVAECriterion(model.config)
    x = images()
    torch.manual_seed(5)
    _, logs = crit(model, x, 0)
    # by hand: same forward (same noise), gradients of each term at W = encoder.conv_out.weight via .backward()
    W = model.encoder.conv_out.weight

    def grad_of(which: str) -> torch.Tensor:
        torch.manual_seed(5)
        recon, _, z_proj = model(x)
        f = model.vfm_features(x, size=tuple(z_proj.shape[-2:]))
        distmat, cos = V.vf_loss_terms(z_proj, f, 0.25, 0.5)
        term = (recon - x).abs().mean() if which == "nll" else distmat + cos
        model.zero_grad()
        term.backward()
        return W.grad.clone()

    g_nll, g_vf = grad_of("nll"), grad_of("vf")
    want = 0.3 * g_nll.norm().item() / (g_vf.norm().item() + 1e-4)
    assert logs["vf_adaptive"].item() == pytest.approx(want, rel=1e-4)
    # consequence: the weighted VF gradient at W has vf_weight times the reconstruction gradient's norm
    assert (want / 0.3 * g_vf).norm().item() == pytest.approx(g_nll.norm().item(), rel=1e-3)


def test_adaptive_weight_function_and_eval_mode():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    nll, vf = (3 * w).sum(), (w ** 2).sum()  # grads (3, 3) and (2, 4)
    got = V.adaptive_vf_weight(nll, vf, w, vf_weight=0.5)
    assert got.item() == pytest.approx(0.5 * math.sqrt(18) / (math.sqrt(20) + 1e-4))
    assert not got.requires_grad
    with torch.no_grad():
        assert V.adaptive_vf_weight((3 * w).sum(), (w ** 2).sum(), w, 0.5).item() == 0.0


def test_fixed_weight_when_not_adaptive():
    model = tiny_model(adaptive_vf=False, vf_weight=0.2)
    _, logs = V.VAVAECriterion(model.config)(model, images(), 0)
    assert logs["vf_adaptive"].item() == pytest.approx(0.2)


# ---------------------------------------------------------------------------- model basics
def test_vfm_outside_state_dict_and_projection_inside():
    model = tiny_model()
    keys = list(model.state_dict())
    assert "vf_proj.weight" in keys and "vf_proj.bias" not in keys
    assert not any("vfm" in k for k in keys)
    assert tuple(model.vf_proj.weight.shape) == (D, 4, 1, 1)
    feats = model.vfm_features(images(), size=(8, 8))  # stub grid 4x4 -> latent grid 8x8
    assert feats.shape == (4, D, 8, 8) and not feats.requires_grad


@pytest.mark.parametrize("ldm", [False, True])
def test_shapes(ldm):
    kw = dict(attn_stages=(1,), downsample_padding="ldm") if ldm else {}
    model = tiny_model(**kw).eval()
    x = images(2)
    z = model.encode(x)
    assert tuple(z.shape[1:]) == model.latent_shape == (4, 8, 8)
    assert model.decode(z).shape == x.shape
    recon, posterior, z_proj = model(x)
    assert recon.shape == x.shape and z_proj.shape == (2, D, 8, 8)
    if ldm:
        assert "encoder.stages.1.attn.0.attn.qkv.weight" in model.state_dict()
        assert "decoder.stages.0.attn.1.attn.qkv.weight" in model.state_dict()  # decoder stage 0 = level 1
        assert isinstance(model.encoder.stages[0].down, V.LDMDownsample)


def test_ldm_downsample_pads_bottom_right():
    down = V.LDMDownsample(2)
    x = torch.randn(1, 2, 6, 6)
    want = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), want) and down(x).shape == (1, 2, 3, 3)


@pytest.mark.parametrize("ldm", [False, True])
def test_save_load_bit_exact(tmp_path, ldm):
    kw = dict(attn_stages=(0, 1), downsample_padding="ldm") if ldm else {}
    model = tiny_model(**kw).eval()
    x = images(2)
    model.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, V.VAVAE) and loaded.config == model.config
    with torch.no_grad():
        z = model.encode(x)
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), model.decode(z))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_training_steps_lower_the_loss():
    model = tiny_model()
    crit = V.VAVAECriterion(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = images(8)
    losses = []
    for step in range(12):
        torch.manual_seed(step)
        loss, logs = crit(model, x, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3])
    assert model.vf_proj.weight.grad is not None and model.vf_proj.weight.grad.abs().sum() > 0


def test_bad_configs():
    for kw in (dict(downsample_padding="reflect"), dict(attn_stages=(2,)), dict(m_cos=-0.1), dict(m_dist=3.0),
               dict(vf_weight=-1.0), dict(encoder=None), dict(ch_mult=())):
        with pytest.raises(ConfigError):
            tiny_config(**kw)
    tiny_config(encoder=None, vf_weight=0.0)  # a plain LDM KL-VAE is fine
    with pytest.raises(ConfigError):
        V.VAVAE(tiny_config(encoder="mobilenet_v2", vf_dim=D)).vfm()  # 96-d tokens vs vf_dim 12


def test_paper_recipe_loads():
    from manifold_lab.tokenizers.training import load_recipe

    r = load_recipe("vavae", V.VAVAE_SPEC.paper_recipe)
    m = r.model
    assert (m.image_size, m.z_channels, m.base_channels, tuple(m.ch_mult)) == (256, 32, 128, (1, 1, 2, 2, 4))
    assert m.encoder == "dinov2_vitl14" and m.vf_dim == 1024 and m.adaptive_vf
    assert (m.m_dist, m.m_cos, m.kl_weight, m.perceptual_weight) == (0.25, 0.5, 1e-6, 1.0)
    assert m.attn_stages == (4,) and m.downsample_padding == "ldm" and m.gan.weight == 0.5
    assert r.train.precision == "bf16" and r.data.image_size == 256
    cpu = load_recipe("vavae")
    assert cpu.model.encoder == "mobilenet_v2" and cpu.model.gan.weight == 0.0


def test_train_tokenizer_smoke(tmp_path):
    from manifold_lab.tokenizers.training import train_tokenizer

    tok = train_tokenizer("vavae", overrides=["train.steps=2", "train.batch_size=4", "train.ckpt_every=2",
                                              "train.log_every=1", "train.tensorboard=false",
                                              "data.stats_images=8", "data.stats_batch_size=8"],
                          run_dir=tmp_path / "run", progress=False)
    assert isinstance(tok, V.VAVAE) and tok.latent_shape == (4, 8, 8)
    again = load_tokenizer(tmp_path / "run" / "tokenizer")
    x = images(2, size=32)
    with torch.no_grad():
        assert torch.equal(again.encode(x), tok.encode(x))


def test_reference_map_is_the_vf_loss_target_at_the_latent_grid():
    m = tiny_model()
    x = images()
    maps = m.reference_maps(x)
    assert set(maps) == {"vfm_features"}
    assert maps["vfm_features"].shape == (4, D, *m.latent_shape[1:])  # the stub's 4x4 grid resized to 8x8
    assert torch.equal(maps["vfm_features"], m.vfm_features(x, size=tuple(m.latent_shape[1:])))
    assert tiny_model(encoder=None, vf_dim=0, vf_weight=0.0).reference_maps(x) == {}
