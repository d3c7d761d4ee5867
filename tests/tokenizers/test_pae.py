"""PAE (Prior-Aligned AutoEncoder): the paper's mechanics, every ablation switch, save/load, training.

Tiny models throughout: 16x16 images, MobileNetV2 at a 64 px input (a 4x4 grid of 96-d tokens),
one block everywhere, so the whole file runs in seconds on a shared CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import manifold_lab.tokenizers.pae as pae_mod
from manifold_lab.errors import ConfigError
from manifold_lab.nn.vit import to_tokens
from manifold_lab.tokenizers.base import load_tokenizer
from manifold_lab.tokenizers.pae import (PAE, PAECriterion, PAEConfig, angle_degrees, rms_normalize, scr_loss,
                                         ssr_loss)
from manifold_lab.tokenizers.pae_targets import SemanticProjector, TargetConfig


def tiny(**kw) -> PAEConfig:
    targets = kw.pop("targets", None) or TargetConfig(mode=kw.pop("mode", "refined"), projector_hidden=16,
                                                       projector_steps=2, projector_images=8,
                                                       projector_batch_size=4)
    base = dict(image_size=16, encoder_input_size=64, dam_depth=1, dam_heads=2, block_heads=2,
                compressor_depth=1, decompressor_depth=1, z_channels=4, decoder_width=32, decoder_depth=1,
                decoder_heads=2, mlp_ratio=2.0, targets=targets)
    base.update(kw)
    return PAEConfig(**base)


@pytest.fixture(scope="module")
def x16() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    low = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=16, mode="bilinear", align_corners=False)


def _model(**kw) -> PAE:
    torch.manual_seed(0)
    return PAE(tiny(**kw))


# ----- architecture ---------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["dam", "residual_add", "concat", "finetune"])
def test_fusion_path_is_exactly_the_frozen_features_at_init(fusion, x16):
    model = _model(fusion=fusion)
    feats = model.frozen_features(x16)
    fused = model.fused_tokens(x16)
    assert fused.shape == (4, 16, model.vfm_dim)
    assert torch.equal(fused, to_tokens(feats)), (fused - to_tokens(feats)).abs().max()


def test_dam_fusion_is_the_papers_layernormed_sft_and_moves_once_trained(x16):
    model = _model()
    torch.manual_seed(3)
    with torch.no_grad():
        model.sft.weight.normal_(0, 0.05)
        model.sft.bias.normal_(0, 0.05)
    f = to_tokens(model.frozen_features(x16))
    gamma, beta = model.sft(model.pixel(x16, f)).chunk(2, dim=-1)
    paper = torch.nn.functional.layer_norm(f * (1 + gamma) + beta, (f.shape[-1],), eps=1e-6)
    fused = model.fused_tokens(x16)
    assert torch.allclose(fused, paper, atol=1e-5)
    assert (fused - f).abs().max() > 1e-2  # the modulation is live once gamma/beta are not zero


def test_release_layout_switches(x16):
    model = _model(compressor_arch="attention", compressor_qkv_bias=False, dam_final_norm=False,
                   sft_norm_affine=True, dam_input_size=32, decoder_arch="mae", decoder_mlp_ratio=3.0)
    keys = model.state_dict()
    assert keys["decoder.cls_token"].shape == (1, 1, 32) and keys["decoder.pos_embed"].shape == (1, 17, 32)
    assert keys["decoder.blocks.0.fc1.weight"].shape == (96, 32) and "decoder.blocks.0.q.weight" in keys
    assert model.decode(model.encode(x16)).shape == x16.shape
    assert "compressor.0.qkv.weight" in keys and "compressor.0.qkv.bias" not in keys
    assert "decompressor.0.proj.weight" in keys and "compressor.0.norm1.weight" not in keys
    assert "sft_norm.weight" in keys and not any(k.startswith("pixel.norm.") for k in keys)
    assert keys["pixel.patch_embed.weight"].shape[-1] == 8  # 32 px DAM input on the 4x4 VFM grid
    f = to_tokens(model.frozen_features(x16))
    assert torch.allclose(model.fused_tokens(x16), f, atol=1e-4)  # literal LN(F): F only up to eps
    assert model.encode(x16).shape == (4, 4, 4, 4)


def test_frozen_features_are_affine_free_layernormed_vfm_tokens(x16):
    model = _model()
    f = model.frozen_features(x16)
    raw = model.frozen("vfm").encoder(x16)
    assert f.shape == raw.shape == (4, 96, 4, 4)
    tok = to_tokens(f)
    assert torch.allclose(tok.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(tok.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    assert not any(p.requires_grad for p in model.frozen("vfm").parameters())
    assert not any(k.startswith("vfm.") or ".encoder.features" in k for k in model.state_dict())


def test_latent_tokens_have_rms_one(x16):
    model = _model()
    z = model.encode(x16 * 0.3)
    assert z.shape == (4, *model.latent_shape) == (4, 4, 4, 4)
    rms = z.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-5)
    big = rms_normalize(torch.randn(2, 7, 3, 3) * 50)
    assert torch.allclose(big.pow(2).mean(1).sqrt(), torch.ones(2, 3, 3), atol=1e-5)


def test_shapes_match_latent_shape_and_resolution_rule(x16):
    model = _model().eval()
    with torch.no_grad():
        z = model.encode(x16)
        assert tuple(z.shape[1:]) == model.latent_shape
        assert model.decode(z).shape == x16.shape
    assert model.supports_resolution(16) and not model.supports_resolution(32)
    assert model.last_layer() is model.decoder.head.weight


# ----- regularisers ---------------------------------------------------------------------------
def test_mcr_perturbations_sit_at_the_configured_angles():
    model = _model()
    z = rms_normalize(torch.randn(3, 8, 4, 4))
    z_m, z_l = model.rotate(z, [42.5, 85.0])
    for a, b, want in ((z, z_m, 42.5), (z, z_l, 85.0), (z_m, z_l, 42.5)):
        ang = angle_degrees(a, b)
        assert torch.allclose(ang, torch.full_like(ang, want), atol=1e-3), (want, ang.min(), ang.max())
    for t in (z_m, z_l):  # every perturbed token stays on its RMS sphere
        assert torch.allclose(t.pow(2).mean(1).sqrt(), torch.ones(3, 4, 4), atol=1e-5)
    # a fresh random direction per call (and per token)
    (other,) = model.rotate(z, [42.5])
    assert not torch.allclose(other, z_m)


@pytest.mark.parametrize("mode,count", [("small", 1), ("large", 1), ("cascaded", 2), ("none", 0)])
def test_mcr_modes_decode_the_configured_perturbations(mode, count, x16):
    model = _model(mcr_mode=mode)
    torch.manual_seed(5)
    out = model(x16)
    assert len(out["mcr"]) == count
    for pred, target in out["mcr"]:
        assert pred.shape == x16.shape and not target.requires_grad
    if mode == "cascaded":  # second pair's target is the (detached) medium decode
        assert torch.equal(out["mcr"][1][1], out["mcr"][0][0].detach())
    if count:
        assert torch.equal(out["mcr"][0][1], out["recon"].detach())


def test_ssr_is_zero_when_the_latent_gram_equals_the_targets():
    z = torch.randn(2, 4, 3, 3)
    target = torch.cat([3.0 * z, torch.zeros(2, 12, 3, 3)], dim=1)  # other width/scale, same cosine Gram
    assert ssr_loss(z, target).item() == pytest.approx(0.0, abs=1e-10)
    assert ssr_loss(z, torch.randn(2, 16, 3, 3)).item() > 1e-3


def test_scr_is_zero_for_aligned_targets_and_at_most_four():
    z = torch.randn(2, 4, 3, 3)
    assert scr_loss(z, 2.5 * z).item() == pytest.approx(0.0, abs=1e-6)
    assert 0 < scr_loss(z, -z).item() <= 4.0 + 1e-6


def test_structural_and_semantic_targets_follow_the_target_mode(x16):
    refined, raw = _model(), _model(mode="raw")
    f = refined.frozen_features(x16)
    assert torch.equal(raw.structural_target(f), f)
    assert not torch.allclose(refined.structural_target(f), f)
    assert refined.semantic_target(f).shape == (4, 4, 4, 4)
    assert not hasattr(raw, "sem_projector") and hasattr(raw, "scr_head")
    assert hasattr(refined, "sem_projector") and not hasattr(refined, "scr_head")


@pytest.mark.parametrize("mode", ["refined", "raw"])
def test_reference_maps_are_the_frozen_features_and_the_ssr_target(mode, x16):
    from manifold_lab.tokenizers import HasReferenceMaps, VAE, VAEConfig

    model = _model(mode=mode)
    assert isinstance(model, HasReferenceMaps) and not isinstance(VAE(VAEConfig()), HasReferenceMaps)
    maps = model.reference_maps(x16)
    feats = model.frozen_features(x16)
    assert torch.equal(maps["vfm_features"], feats)
    if mode == "refined":
        assert set(maps) == {"vfm_features", "ssr_target"}
        assert torch.equal(maps["ssr_target"], model.structural_target(feats))
        assert maps["ssr_target"].shape[:2] == feats.shape[:2]
    else:  # raw: T_struct is F itself, nothing more to compare with
        assert set(maps) == {"vfm_features"}


def test_semantic_projector_is_a_frozen_submodule_in_the_state_dict():
    model = _model()
    projector = SemanticProjector(model.vfm_dim, 4, 16)
    torch.nn.init.normal_(projector.proj[0].weight)
    model.set_semantic_projector(projector)
    assert torch.equal(model.sem_projector.proj[0].weight, projector.proj[0].weight)
    assert not any(p.requires_grad for p in model.sem_projector.parameters())
    assert "sem_projector.proj.0.weight" in model.state_dict()
    with pytest.raises(ConfigError):
        _model(mode="raw").set_semantic_projector(projector)


# ----- training -------------------------------------------------------------------------------
CASES = [
    dict(),  # DAM, all regularisers, refined
    dict(fusion="finetune"),
    dict(fusion="residual_add", mode="raw"),
    dict(fusion="concat"),
    dict(ssr_weight=0, mcr_weight=0, scr_weight=0),
    dict(mcr_weight=0, scr_weight=0),
    dict(ssr_weight=0, scr_weight=0, mcr_mode="small"),
    dict(ssr_weight=0, mcr_weight=0, mode="raw"),
    dict(mcr_mode="large", perceptual_weight=0.5, perceptual_name="mobilenet-deep"),
    dict(compressor_arch="attention", compressor_qkv_bias=False, dam_final_norm=False, sft_norm_affine=True,
         dam_input_size=32, decoder_arch="mae", decoder_mlp_ratio=3.0, decoder_ln_eps=1e-12),  # release layout
]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
def test_each_switch_builds_and_trains_a_step(kw, x16):
    model = _model(**kw).train()
    cfg = model.config
    crit = PAECriterion(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, logs = crit(model, (x16, torch.zeros(4)), 0)
    assert torch.isfinite(loss)
    for key, weight in (("ssr", cfg.ssr_weight), ("mcr", cfg.mcr_weight), ("scr", cfg.scr_weight)):
        assert (key in logs) == (weight > 0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)
    if cfg.fusion == "dam":  # zero-initialised SFT receives a gradient and moves off zero
        assert model.sft.weight.abs().sum() > 0
    if cfg.fusion == "finetune":  # the trainable encoder copy is really trained and really a copy
        key = next(k for k in after if k.startswith("vfm_trainable."))
        assert not torch.equal(before[key], after[key])
        ema = copy.deepcopy(model)
        assert ema.vfm_trainable.features[0][0].weight is not model.vfm_trainable.features[0][0].weight
        assert ema.frozen("vfm") is model.frozen("vfm")
    for k in after:
        if k.startswith("sem_projector."):
            assert torch.equal(before[k], after[k])


def test_a_few_steps_lower_the_loss(x16):
    model = _model().train()
    crit = PAECriterion(model.config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(step)
        loss, _ = crit(model, x16, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_save_load_round_trips_bit_exactly(tmp_path, x16):
    model = _model()
    projector = SemanticProjector(model.vfm_dim, 4, 16)
    torch.nn.init.normal_(projector.proj[2].weight)
    model.set_semantic_projector(projector)
    with torch.no_grad():
        model.sft.weight.normal_(0, 0.02)
    model.eval().save(tmp_path / "pae")
    loaded = load_tokenizer(tmp_path / "pae")
    assert isinstance(loaded, PAE)
    with torch.no_grad():
        z0, z1 = model.encode(x16), loaded.encode(x16)
        assert torch.equal(z0, z1)
        assert torch.equal(model.decode(z0), loaded.decode(z1))
    assert torch.equal(loaded.sem_projector.proj[2].weight, projector.proj[2].weight)
    assert not any(p.requires_grad for p in loaded.sem_projector.parameters())


@pytest.mark.parametrize("bad", [
    dict(fusion="gated"), dict(mcr_mode="huge"), dict(decoder_arch="conv"), dict(compressor_arch="mlp"), dict(ssr_weight=-1.0), dict(z_channels=0),
    dict(mcr_medium_deg=90.0, mcr_large_deg=60.0), dict(mcr_large_deg=180.0), dict(feature_norm="batch"),
])
def test_bad_config_raises_config_error(bad):
    with pytest.raises(ConfigError):
        tiny(**bad)


def test_bad_geometry_raises_config_error():
    with pytest.raises(ConfigError, match="multiple of the VFM grid"):
        PAE(tiny(image_size=18))
    with pytest.raises(ConfigError, match="divisible"):
        PAE(tiny(block_heads=5))


def test_recipes_load():
    from manifold_lab.tokenizers.training import load_recipe

    cpu = load_recipe("pae")
    assert cpu.model.targets.mode == "refined" and cpu.model.z_channels == 8 and cpu.data.image_size == 32
    assert min(cpu.model.ssr_weight, cpu.model.mcr_weight, cpu.model.scr_weight) > 0
    paper = load_recipe("pae", pae_mod.PAE_SPEC.paper_recipe)
    m = paper.model
    assert (m.encoder, m.encoder_input_size, m.final_norm_affine, m.z_channels) == ("dinov2_vitl14_reg", 224, False, 32)
    assert (m.perceptual_weight, m.gan.weight, m.ssr_weight, m.mcr_weight, m.scr_weight) == (1.0, 0.5, 0.2, 0.5, 1.0)
    assert paper.train.precision == "bf16" and paper.data.image_size == 256
    # the regulariser ablation (reports/pae_ablation/variants.yaml) switches exactly the named terms on
    from pathlib import Path

    from manifold_lab.measure.compare import load_comparison

    ablation = load_comparison(Path(__file__).resolve().parents[2] / "reports" / "pae_ablation" / "variants.yaml")
    expected = {"no regulariser": set(), "SSR": {"ssr"}, "MCR": {"mcr"}, "SCR": {"scr"}, "all": {"ssr", "mcr", "scr"}}
    assert [v.label for v in ablation.variants] == list(expected)
    for variant in ablation.variants:
        r = load_recipe("pae", None, variant.set)
        on = {k for k in ("ssr", "mcr", "scr") if getattr(r.model, f"{k}_weight") > 0}
        assert on == expected[variant.label]


def test_train_tokenizer_smoke(tmp_path, x16):
    from manifold_lab.tokenizers.training import train_tokenizer

    overrides = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=2",
                 "train.tensorboard=false", "train.optim.warmup_steps=0",
                 "data.image_size=16", "data.stats_images=8", "data.stats_batch_size=8"]
    for key, value in dict(image_size=16, encoder_input_size=64, dam_depth=1, dam_heads=2, block_heads=2,
                           z_channels=4, decoder_width=32, decoder_depth=1, decoder_heads=2).items():
        overrides.append(f"model.{key}={value}")
    overrides += ["model.targets.projector_hidden=16", "model.targets.projector_steps=2",
                  "model.targets.projector_images=8", "model.targets.projector_batch_size=4"]
    tok = train_tokenizer("pae", overrides=overrides, run_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "targets" / "projector.safetensors").is_file()
    loaded = load_tokenizer(tmp_path / "run" / "tokenizer")
    with torch.no_grad():
        assert torch.equal(tok.encode(x16), loaded.encode(x16))
    from manifold_lab.tokenizers.pae_targets import load_semantic_projector

    saved = load_semantic_projector(tmp_path / "run" / "targets" / "projector.safetensors", loaded.config.targets,
                                    loaded.vfm_dim, 4)
    assert torch.equal(saved.proj[0].weight, loaded.sem_projector.proj[0].weight)
    assert math.isfinite(float(loaded.latent_stats.std.min()))
