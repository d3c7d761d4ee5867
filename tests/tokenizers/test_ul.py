"""Unified Latents: the prior's ELBO weight in closed form, the fixed-noise latent, bits per pixel
that fall with the loss factor, deterministic reverse-diffusion decoding, and the usual tokenizer
contract (shapes, training lowers the loss, bit-exact save/load, recipes, one-line config errors)."""

from __future__ import annotations

import math

import pytest
import torch

import manifold_lab.tokenizers.ul  # noqa: F401  (registers "ul")
from manifold_lab.errors import ConfigError
from manifold_lab.tokenizers.base import load_tokenizer
from manifold_lab.tokenizers.registry import get_spec
from manifold_lab.tokenizers.training import load_recipe, train_tokenizer
from manifold_lab.tokenizers.ul import ULConfig, ULCriterion, UnifiedLatents
from manifold_lab.tokenizers.ul_diffusion import (LogSNRSchedule, alpha_sigma, prior_elbo_weight,
                                                  sigmoid_elbo_weight, terminal_kl)


def tiny(**kw) -> ULConfig:
    """16x16 images -> 2x8x8 latents; every part a few thousand parameters."""
    base = dict(image_size=16, z_channels=2, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                prior_width=16, prior_depth=1, prior_heads=2, dec_patch=2, dec_base_channels=16, dec_ch_mult=(1,),
                dec_num_res_blocks=1, decode_steps=4, bpp_t_samples=8)
    base.update(kw)
    return ULConfig(**base)


@pytest.fixture
def images() -> torch.Tensor:
    """Smooth structured 16x16 images in [-1, 1], fixed seed."""
    g = torch.Generator().manual_seed(1)
    low = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=16, mode="bilinear", align_corners=False)


# ----- the schedule maths ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_prior_elbo_weight_matches_closed_form(kind) -> None:
    sched = LogSNRSchedule(kind, lambda_min=-10.0, lambda_max=5.0)
    t = torch.tensor([0.0, 0.013, 0.1, 0.37, 0.5, 0.77, 0.99, 1.0], dtype=torch.float64, requires_grad=True)
    lam = sched.lam(t)
    (dlam,) = torch.autograd.grad(lam.sum(), t)  # autograd derivative of lambda(t)
    expected = -dlam * torch.exp(lam) / 2
    got = prior_elbo_weight(sched, t.detach())
    assert torch.allclose(got, expected.detach(), rtol=1e-9, atol=0)
    # the endpoints: lambda(0) = 5 (the encoder's noise level), lambda(1) = lambda_min
    assert lam[0].item() == pytest.approx(5.0, abs=1e-9) and lam[-1].item() == pytest.approx(-10.0, abs=1e-9)
    # by hand
    if kind == "linear":
        assert torch.allclose(got, 15.0 * torch.exp(lam.detach()) / 2)
    else:
        a, b = math.atan(math.exp(-2.5)), math.atan(math.exp(5.0))
        u = a + t.detach() * (b - a)
        assert torch.allclose(got, 4 * (b - a) / torch.sin(2 * u) * torch.exp(lam.detach()) / 2, rtol=1e-9)


def test_elbo_weight_integrates_to_the_lambda_integral() -> None:
    """Change of variables: int_0^1 w(t) dt = int_{lmin}^{lmax} exp(l)/2 dl for any schedule shape."""
    t = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    exact = (math.exp(5.0) - math.exp(-10.0)) / 2
    for kind in ("cosine", "linear"):
        w = prior_elbo_weight(LogSNRSchedule(kind, -10.0, 5.0), t)
        assert w.mean().item() == pytest.approx(exact, rel=1e-4)


def test_sigmoid_weight_is_eps_weight_times_sigmoid() -> None:
    sched = LogSNRSchedule("cosine", -15.0, 15.0, shift=1.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    lam = sched.lam(t)
    for bias in (-3.0, 0.0, 2.0):
        expected = -sched.dlam_dt(t) / 2 * torch.sigmoid(bias - lam) * torch.exp(lam)
        assert torch.allclose(sigmoid_elbo_weight(sched, t, bias), expected, rtol=1e-9)
    assert torch.isfinite(sigmoid_elbo_weight(sched, t.float(), 0.0)).all()  # no overflow at lambda = 15


def test_terminal_kl_matches_torch_distributions() -> None:
    sched = LogSNRSchedule("cosine", -4.0, 5.0)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a, s = alpha_sigma(torch.tensor(-4.0, dtype=torch.float64))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(float(a) * x.double(), float(s)),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(terminal_kl(sched, x).double(), ref, rtol=1e-5)


# ----- the model ------------------------------------------------------------------------------------
def test_fixed_noise_latent_and_deterministic_encode(images) -> None:
    torch.manual_seed(0)
    model = UnifiedLatents(tiny()).eval()
    assert model.sigma0 == pytest.approx(math.sqrt(1 / (1 + math.exp(5.0))))
    assert model.alpha0 ** 2 + model.sigma0 ** 2 == pytest.approx(1.0)
    with torch.no_grad():
        z = model.encode(images)
        assert torch.equal(z, model.encode(images))
        noise = torch.randn_like(z)
        assert torch.allclose(model.noisy_latent(z, noise), model.alpha0 * z + model.sigma0 * noise)


def test_prior_loss_is_the_weighted_mse_plus_terminal_kl(images) -> None:
    torch.manual_seed(0)
    model = UnifiedLatents(tiny())  # the prior's head is zero-initialised: v_hat = 0, z_hat = alpha_t z_t
    with torch.no_grad():
        z = model.encode(images)
        t = torch.linspace(0.05, 0.95, len(images))
        noise = torch.randn_like(z)
        got = model.prior_nats(z, t, noise)
        a, s = alpha_sigma(model.prior_schedule.lam(t))
        a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        z_hat = a * (a * z + s * noise)
        expected = prior_elbo_weight(model.prior_schedule, t) * (z - z_hat).pow(2).flatten(1).sum(1) \
            + terminal_kl(model.prior_schedule, z)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_shapes_and_deterministic_decoding(images) -> None:
    torch.manual_seed(0)
    model = UnifiedLatents(tiny()).eval()
    assert model.latent_shape == (2, 8, 8)
    with torch.no_grad():
        z = model.encode(images)
        assert tuple(z.shape[1:]) == model.latent_shape
        x1 = model.decode(z)
        assert x1.shape == images.shape and torch.isfinite(x1).all()
        assert torch.equal(x1, model.decode(z))  # fixed seed: decode is a function of z
        assert not torch.equal(x1, model.decode(z, steps=2))  # the number of steps is honoured
        assert x1.abs().max() <= 1.0  # clipped x prediction
    with pytest.raises(Exception, match="decode expects"):
        model.decode(torch.zeros(1, 3, 8, 8))


def _train(model: UnifiedLatents, images: torch.Tensor, steps: int, lr: float = 3e-3, seed: int = 0) -> list[float]:
    crit = ULCriterion(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(seed * 1000 + step)
        loss, logs = crit(model, images, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert set(logs) >= {"prior", "decoder", "bpp", "bpd"}
    return losses


def test_a_few_steps_lower_the_loss(images) -> None:
    torch.manual_seed(0)
    model = UnifiedLatents(tiny())
    losses = _train(model, images, 40)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses


def test_bits_per_pixel_positive_and_fall_with_the_loss_factor(images) -> None:
    """Same seed, same data, same steps: only the loss factor differs. A smaller loss factor makes the
    latent's bits relatively more expensive, so the prior's bound on them (bits per pixel) is lower.

    The effect needs the decoder to have started using z: over 30 steps it is within noise; at 200
    steps (lr 3e-3) we measured bpp 0.32 (LF 1.7) vs 0.21 (LF 0.3) for seed 0 and 0.18 vs 0.15 for seed 1.
    """
    bpp = {}
    for lf in (1.7, 0.3):
        torch.manual_seed(0)
        model = UnifiedLatents(tiny(loss_factor=lf))
        _train(model, images, 200, lr=3e-3)
        model.eval()
        bpp[lf] = model.bits_per_pixel(images, seed=0)
        assert (bpp[lf] > 0).all()
        # fixed seed: the estimate is reproducible
        assert torch.equal(bpp[lf], model.bits_per_pixel(images, seed=0))
    assert bpp[0.3].mean() < 0.9 * bpp[1.7].mean(), bpp


def test_save_load_round_trip_is_bit_exact(tmp_path, images) -> None:
    torch.manual_seed(0)
    model = UnifiedLatents(tiny())
    _train(model, images, 2)
    model.eval()
    model.save(tmp_path / "ul")
    loaded = load_tokenizer(tmp_path / "ul")
    assert isinstance(loaded, UnifiedLatents)
    with torch.no_grad():
        z = model.encode(images)
        assert torch.equal(z, loaded.encode(images))
        assert torch.equal(model.decode(z), loaded.decode(z))
        assert torch.equal(model.bits_per_pixel(images), loaded.bits_per_pixel(images))


@pytest.mark.parametrize("bad, match", [
    (dict(loss_factor=0.0), "loss_factor"),
    (dict(prior_lambda_min=6.0), "prior_lambda_min"),
    (dict(prior_schedule="sqrt"), "prior_schedule"),
    (dict(decode_steps=0), "decode_steps"),
    (dict(prior_width=18, prior_heads=4), "prior_width"),
    (dict(dec_ch_mult=()), "dec_ch_mult"),
])
def test_bad_config_is_one_line_config_error(bad, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        tiny(**bad)
    assert "\n" not in str(info.value)


def test_recipes_load_and_spec() -> None:
    spec = get_spec("ul")
    assert spec.criterion is ULCriterion and spec.paper_recipe is not None
    cpu = load_recipe("ul")
    assert cpu.model.image_size == 32 and cpu.data.name == "fashion-mnist"
    assert UnifiedLatents(cpu.model).latent_shape == (cpu.model.z_channels, 8, 8)
    paper = load_recipe("ul", spec.paper_recipe)
    assert paper.model.image_size == 256 and paper.model.latent_log_snr == 5.0
    assert paper.train.precision == "bf16" and 1.3 <= paper.model.loss_factor <= 1.7
    assert 256 // paper.model.downsample == 16  # f16 latents


def test_train_tokenizer_smoke(tmp_path) -> None:
    overrides = ["train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.tensorboard=false",
                 "data.stats_images=8", "data.stats_batch_size=8", "data.image_size=16", "model.image_size=16",
                 "model.base_channels=8", "model.dec_base_channels=8", "model.prior_width=16",
                 "model.prior_depth=1", "model.decode_steps=2", "model.dec_ch_mult=[1]"]
    tok = train_tokenizer("ul", overrides=overrides, run_dir=tmp_path / "run", progress=False)
    assert isinstance(tok, UnifiedLatents) and tok.latent_stats.channels == tok.z_channels
    loaded = load_tokenizer(tmp_path / "run" / "tokenizer")
    x = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(tok.decode(tok.encode(x)), loaded.decode(loaded.encode(x)))


class _OracleDenoiser(torch.nn.Module):
    """Returns the exact v for a known clean image: any correct sampler must land on that image."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target

    def forward(self, x_t: torch.Tensor, z0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        a, s = alpha_sigma(lam.double())
        a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        eps = (x_t.double() - a * self.target.double()) / s
        return (a * eps - s * self.target.double()).float()


def test_ddim_sampler_recovers_the_image_with_an_oracle_denoiser(images) -> None:
    torch.manual_seed(0)
    model = UnifiedLatents(tiny(decode_steps=3)).eval()
    model.decoder = _OracleDenoiser(images * 0.9)
    with torch.no_grad():
        out = model.decode(model.encode(images))
    assert torch.allclose(out, images * 0.9, atol=1e-4)


def test_prior_warmup_ramp() -> None:
    assert ULCriterion(tiny()).prior_ramp(0) == 1.0  # the paper: no warm-up
    crit = ULCriterion(tiny(prior_warmup_steps=4))
    assert [crit.prior_ramp(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="prior_warmup_steps"):
        tiny(prior_warmup_steps=-1)
