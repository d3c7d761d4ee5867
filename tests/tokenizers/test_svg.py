"""SVG: residual branch (mask-token dropout, distribution matching), shapes, save/load, training runs."""

from __future__ import annotations

import pytest
import torch

import manifold_lab.tokenizers.svg as svg_module  # noqa: F401  (registers "svg")
from manifold_lab.errors import ConfigError
from manifold_lab.tokenizers import load_recipe, load_tokenizer, train_tokenizer
from manifold_lab.tokenizers.registry import get_spec
from manifold_lab.tokenizers.svg import SVG, SVGConfig, SVGCriterion, match_distribution, scalar_stats

TINY = dict(residual_width=16, residual_depth=1, residual_heads=2, decoder_channels=8, decoder_norm_groups=4,
            perceptual_weight=0.0)


def tiny(**kw) -> SVG:
    torch.manual_seed(0)
    return SVG(SVGConfig(**{**TINY, **kw}))


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    low = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)


def test_shapes_and_concatenation(x32) -> None:
    m = tiny().eval()
    assert m.latent_shape == (104, 8, 8)
    z = m.encode(x32)
    assert tuple(z.shape) == (6, 104, 8, 8)
    assert torch.equal(z[:, :96], m.frozen("encoder")(x32))  # the frozen tokens pass through untouched
    assert tuple(m.decode(z).shape) == tuple(x32.shape)
    assert torch.equal(z, m.encode(x32))  # deterministic
    # per image: encoding one image alone gives the same latent as inside a batch (running stats at eval)
    assert torch.allclose(m.encode(x32[:1]), z[:1], atol=1e-5)


def test_reference_map_is_the_frozen_part_of_the_latent(x32) -> None:
    m = tiny().eval()
    maps = m.reference_maps(x32)
    assert set(maps) == {"vfm_features"} and torch.equal(maps["vfm_features"], m.encode(x32)[:, :96])


def test_distribution_matching_follows_svg() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 12, 3, 3, generator=g) * 2.5 + 0.7
    r = torch.randn(4, 5, 3, 3, generator=g) * 0.1 - 3.0
    m_f, s_f = scalar_stats(f)
    m_r, s_r = scalar_stats(r)
    # SVG: channel-average of per-channel mean / unbiased std over (batch, positions)
    assert torch.allclose(m_f, f.mean(dim=(0, 2, 3)).mean()) and torch.allclose(s_f, f.std(dim=(0, 2, 3)).mean())
    out = match_distribution(r, torch.stack([m_f, s_f, m_r, s_r]))
    assert torch.allclose(out, (r - m_r) / (s_r + 1e-6) * s_f + m_f)
    m_o, s_o = scalar_stats(out)
    assert torch.allclose(m_o, m_f, atol=1e-4) and torch.allclose(s_o, s_f, rtol=1e-3)


def test_training_forward_uses_batch_stats_and_updates_running(x32) -> None:
    m = tiny(mask_ratio=0.0, match_momentum=0.5).train()
    seen = []
    h = m.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    m(x32)
    h.remove()
    z = seen[0]
    f, r = m.frozen("encoder")(x32), m.residual_features(x32)
    m_f, s_f = scalar_stats(f)
    m_o, s_o = scalar_stats(z[:, 96:])
    assert torch.allclose(m_o, m_f, atol=1e-4) and torch.allclose(s_o, s_f, rtol=1e-3)
    expected = torch.tensor([0.0, 1.0, 0.0, 1.0]).lerp(torch.stack([m_f, s_f, *scalar_stats(r)]), 0.5)
    assert torch.allclose(m.match_stats, expected, atol=1e-5)
    # plain_concat: no matching at all
    p = tiny(residual_mode="plain_concat", mask_ratio=0.0).eval()
    assert torch.allclose(p.encode(x32)[:, 96:], p.residual_features(x32), atol=1e-6)


def test_mask_token_dropout_replaces_whole_samples(x32) -> None:
    m = tiny(mask_ratio=0.3)
    r = torch.randn(400, 8, 8, 8)
    out, mask = m.apply_mask(r, generator=torch.Generator().manual_seed(0))
    assert tuple(mask.shape) == (400, 1, 1, 1)
    hit = mask.flatten().bool()
    assert 0.2 < float(hit.float().mean()) < 0.4
    token = m.mask_token.detach().view(1, 8, 1, 1).expand(int(hit.sum()), 8, 8, 8)
    assert torch.equal(out[hit].detach(), token) and torch.equal(out[~hit].detach(), r[~hit])
    tok = tiny(mask_ratio=0.3, mask_unit="token")
    _, mask_t = tok.apply_mask(r, generator=torch.Generator().manual_seed(0))
    assert tuple(mask_t.shape) == (400, 1, 8, 8)
    # eval: never masked
    m.eval()
    assert torch.equal(m.encode(x32), m.encode(x32))
    # the mask token is trained: gradient reaches it when a sample is masked
    m.train()
    m.config.mask_ratio = 0.999
    m(x32).mean().backward()
    assert m.mask_token.grad is not None and float(m.mask_token.grad.abs().sum()) > 0


def test_a_few_steps_lower_the_loss(x32) -> None:
    m = tiny(mask_ratio=0.0)
    crit = SVGCriterion(m.config)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    m.train()
    losses = []
    for step in range(25):
        loss, logs = crit(m, (x32, None), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert set(logs) == {"l1"}
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_save_load_round_trip_bit_exact(tmp_path, x32) -> None:
    m = tiny()
    m.train()
    m(x32)  # move the running matching statistics away from their initial values
    m.eval()
    m.save(tmp_path / "svg")
    back = load_tokenizer(tmp_path / "svg")
    assert isinstance(back, SVG) and torch.equal(back.match_stats, m.match_stats)
    with torch.no_grad():
        z = m.encode(x32)
        assert torch.equal(z, back.encode(x32))
        assert torch.equal(m.decode(z), back.decode(z))


def test_bad_config_raises() -> None:
    for kw in ({"mask_ratio": 1.0}, {"residual_mode": "concat"}, {"mask_unit": "pixel"}, {"residual_channels": 0},
               {"residual_width": 10, "residual_heads": 4}, {"match_momentum": 0.0}, {"decoder_ch_mult": []}):
        with pytest.raises(ConfigError):
            SVGConfig(**kw)
    with pytest.raises(ConfigError):
        SVG(SVGConfig(decoder_ch_mult=(1, 2), **{k: v for k, v in TINY.items()}))  # x2 decoder for a x4 grid


def test_recipes_load() -> None:
    spec = get_spec("svg")
    cpu = load_recipe("svg", spec.default_recipe)
    paper = load_recipe("svg", spec.paper_recipe)
    assert cpu.model.encoder == "mobilenet_v2" and cpu.model.residual_channels == 8
    assert paper.model.encoder == "dinov3_vits16plus" and paper.model.residual_channels == 8
    assert paper.model.mask_ratio == 0.1 and paper.model.residual_mode == "matched"
    assert paper.model.decoder_ch_mult == (1, 1, 2, 2, 4) and paper.model.gan.weight == 0.5


def test_train_tokenizer_smoke(tmp_path) -> None:
    overrides = ["train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.tensorboard=false",
                 "model.residual_width=16", "model.residual_depth=1", "model.residual_heads=2",
                 "model.decoder_channels=8", "model.decoder_norm_groups=4",
                 "data.stats_images=8", "data.stats_batch_size=8"]
    tok = train_tokenizer("svg", overrides=overrides, run_dir=tmp_path / "run", progress=False)
    back = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert back.latent_shape == (104, 8, 8) and back.latent_stats.channels == 104
    assert torch.equal(back.match_stats, tok.match_stats)
