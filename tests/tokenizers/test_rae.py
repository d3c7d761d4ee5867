"""RAE: per-element normalisation, noise-augmented decoder training, save/load, training smoke runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import manifold_lab.tokenizers.rae as rae_module  # noqa: F401  (registers "rae")
from manifold_lab.errors import ConfigError
from manifold_lab.tokenizers import load_recipe, load_tokenizer, train_tokenizer
from manifold_lab.tokenizers.rae import RAE, RAEConfig, RAECriterion, compute_element_stats, prepare_rae
from manifold_lab.tokenizers.registry import get_spec

TINY = dict(decoder_width=32, decoder_depth=1, decoder_heads=2, perceptual_weight=0.0)


def tiny(**kw) -> RAE:
    torch.manual_seed(0)
    return RAE(RAEConfig(**{**TINY, **kw}))


@pytest.fixture(scope="module")
def model() -> RAE:
    return tiny().eval()


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    low = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)


def test_shapes_and_identity_before_stats(model, x32) -> None:
    assert model.latent_shape == (96, 8, 8)
    z = model.encode(x32)
    assert tuple(z.shape) == (6,) + model.latent_shape
    assert tuple(model.decode(z).shape) == tuple(x32.shape)
    assert not model.has_element_stats
    assert torch.equal(z, model.encoder_features(x32))  # identity normaliser until stats exist
    assert not model.supports_resolution(64)


def test_element_stats_are_exact_per_element_and_normalise(x32) -> None:
    m = tiny().eval()
    ds = TensorDataset(x32, torch.zeros(len(x32)))
    mean, var, n = compute_element_stats(m, ds, None, batch_size=4)
    f = m.encoder_features(x32).double()
    assert n == 6 and tuple(mean.shape) == (96, 8, 8)
    assert torch.allclose(mean.double(), f.mean(0), atol=1e-6)
    assert torch.allclose(var.double(), f.var(0, unbiased=False), atol=1e-6, rtol=1e-5)
    m.set_element_stats(mean, var, n)
    z = m.encode(x32)
    ref = (f.float() - mean) / torch.sqrt(var + m.config.stats_eps)  # RAE: var stored, eps inside the sqrt
    assert torch.allclose(z, ref, atol=1e-5)
    assert torch.allclose(m.denormalize_elements(z), f.float(), atol=1e-4)
    # the stats are persistent buffers: they travel with the weights
    sd = m.state_dict()
    assert torch.equal(sd["latent_mean"], mean) and int(sd["latent_stats_images"]) == 6


def test_prepare_is_resumable(tmp_path, x32, monkeypatch) -> None:
    m = tiny(norm_stats_images=5).eval()
    ds = TensorDataset(x32, torch.zeros(len(x32)))
    prepare_rae(m, None, ds, tmp_path, progress=False)
    assert (tmp_path / rae_module.STATS_FILE).is_file() and int(m.latent_stats_images) == 5
    first = m.latent_mean.clone()

    def boom(*a, **k):
        raise AssertionError("stats recomputed although the run dir holds them")

    monkeypatch.setattr(rae_module, "compute_element_stats", boom)
    m2 = tiny(norm_stats_images=5).eval()
    prepare_rae(m2, None, ds, tmp_path, progress=False)
    assert torch.equal(m2.latent_mean, first) and int(m2.latent_stats_images) == 5


def _capture_decoder_input(m: RAE, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = m.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        m(x)
    finally:
        handle.remove()
    return seen[0]


def test_no_noise_at_eval(x32) -> None:
    m = tiny().eval()
    raw = m.encoder_features(x32)
    assert torch.equal(_capture_decoder_input(m, x32), raw)
    torch.manual_seed(3)
    a = m(x32)
    torch.manual_seed(4)
    assert torch.equal(a, m(x32))
    assert torch.allclose(a, m.decode(m.encode(x32)), atol=1e-5)
    m.train()
    assert not torch.equal(_capture_decoder_input(m, x32), raw)  # training: noise-augmented


def test_train_noise_scale_is_uniform_per_sample(x32) -> None:
    from scipy.stats import kstest

    m = tiny(noise_tau=0.8)
    z = torch.zeros(2000, 96, 8, 8)
    noisy, sigma = m.add_noise(z, generator=torch.Generator().manual_seed(0))
    # the scale is one sigma per sample, recovered from the known z
    sigma_hat = noisy.flatten(1).std(1)
    assert torch.allclose(sigma_hat, sigma, rtol=0.1, atol=0.01)
    assert float(sigma.min()) >= 0 and float(sigma.max()) <= 0.8
    assert kstest(sigma_hat.numpy() / 0.8, "uniform").pvalue > 0.01
    assert abs(float(sigma.mean()) - 0.4) < 0.03 and abs(float(sigma.var()) - 0.8 ** 2 / 12) < 0.01
    # and the training forward really applies it: per-sample scale of (decoder input - raw tokens)
    m.train()
    x = x32.repeat(6, 1, 1, 1)  # 36 images
    torch.manual_seed(11)
    diff = (_capture_decoder_input(m, x) - m.encoder_features(x)).flatten(1)
    s = diff.std(1)
    assert float(s.max()) <= 0.8 * 1.1 and float(s.std()) > 0.1  # varies across samples, within [0, tau]
    assert torch.allclose((diff / s[:, None]).std(1), torch.ones(len(x)), atol=0.1)


def test_a_few_steps_lower_the_loss(x32) -> None:
    m = tiny(noise_tau=0.0)
    crit = RAECriterion(m.config)
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
    for kw in ({}, {"decoder_arch": "mae", "pixel_output": "encoder", "decoder_ln_eps": 1e-12}):
        m = tiny(**kw).eval()
        mean, var, n = compute_element_stats(m, TensorDataset(x32, torch.zeros(6)), None)
        m.set_element_stats(mean, var, n)
        m.save(tmp_path / str(len(kw)))
        back = load_tokenizer(tmp_path / str(len(kw)))
        assert isinstance(back, RAE) and back.has_element_stats
        with torch.no_grad():
            z = m.encode(x32)
            assert torch.equal(z, back.encode(x32))
            assert torch.equal(m.decode(z), back.decode(z))


def test_bad_config_raises() -> None:
    for kw in ({"noise_tau": -0.1}, {"decoder_arch": "unet"}, {"decoder_width": 30, "decoder_heads": 4},
               {"norm_stats_images": 0}, {"stats_eps": 0.0}, {"in_channels": 1}):
        with pytest.raises(ConfigError):
            RAEConfig(**kw)
    with pytest.raises(ConfigError):
        RAE(RAEConfig(image_size=36, **TINY))  # not a multiple of the 8x8 token grid


def test_time_shift_and_recipes() -> None:
    m = tiny()
    assert m.shift_dim() == 96 * 8 * 8 and m.time_shift() == pytest.approx(math.sqrt(96 * 64 / 4096))
    spec = get_spec("rae")
    cpu = load_recipe("rae", spec.default_recipe)
    paper = load_recipe("rae", spec.paper_recipe)
    assert cpu.model.encoder == "mobilenet_v2" and cpu.model.gan.weight == 0
    assert paper.model.encoder == "dinov2_vitb14_reg" and not paper.model.final_norm_affine
    assert paper.model.decoder_arch == "mae" and round(paper.model.decoder_width * paper.model.decoder_mlp_ratio) == 4096
    assert paper.model.noise_tau == 0.8 and paper.train.precision == "bf16" and paper.model.gan.weight == 0.75


def test_train_tokenizer_smoke(tmp_path) -> None:
    overrides = ["train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.tensorboard=false",
                 "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
                 "model.norm_stats_images=8", "model.norm_stats_batch_size=8", "data.stats_images=8",
                 "data.stats_batch_size=8"]
    tok = train_tokenizer("rae", overrides=overrides, run_dir=tmp_path / "run", progress=False)
    assert int(tok.latent_stats_images) == 8 and (tmp_path / "run" / rae_module.STATS_FILE).is_file()
    back = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert torch.equal(back.latent_mean, tok.latent_mean)
    assert back.latent_stats.channels == 96
