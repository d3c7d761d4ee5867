"""The VAE objective: known-answer KL, the perceptual term, the adaptive PatchGAN term, a few CPU steps
that lower the loss, the paper recipe, and `manifold-lab train-tokenizer` (2-step runs)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from manifold_lab.errors import ConfigError
from manifold_lab.tokenizers import VAE, get_spec, load_recipe, load_tokenizer, train_tokenizer, vae_loss
from manifold_lab.tokenizers import losses as losses_module
from manifold_lab.tokenizers.vae import DiagonalGaussian, VAECriterion, VAEConfig
from manifold_lab.train.gan import GANConfig, NLayerDiscriminator, generator_loss

from tokenizer_helpers import tiny_config


def test_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1)
    assert torch.allclose(post.kl(), ref, atol=1e-5)
    standard = DiagonalGaussian(torch.zeros(2, 8, 3, 3))  # N(0, I) itself
    assert torch.equal(standard.kl(), torch.zeros(2))


def test_logvar_is_clamped() -> None:
    post = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], 1))
    assert post.logvar.item() == -30.0 and torch.isfinite(post.kl()).all()


class _MeanSquared(nn.Module):
    """A stand-in perceptual distance with a known value: per-image mean squared difference."""

    name = "mse-stand-in"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).pow(2).flatten(1).mean(1)


def test_loss_terms_and_weights(images, monkeypatch) -> None:
    torch.manual_seed(0)
    vae = VAE(tiny_config(perceptual_weight=0.5, perceptual_name="stand-in", kl_weight=1e-3))
    monkeypatch.setitem(losses_module._PERCEPTUAL_CACHE, ("stand-in", "cpu"), _MeanSquared())
    torch.manual_seed(5)
    loss, logs = vae_loss(vae, (images, torch.zeros(len(images))), step=0)
    torch.manual_seed(5)  # the same posterior sample
    with torch.no_grad():
        recon, post = vae(images)
    l1 = (recon - images).abs().mean()
    p = (recon - images).pow(2).flatten(1).mean(1).mean()
    kl = post.kl().mean() / images[0].numel()
    assert torch.allclose(loss, l1 + 0.5 * p + 1e-3 * kl, rtol=1e-5)
    assert float(logs["l1"]) == pytest.approx(float(l1), rel=1e-5)
    assert float(logs["perceptual"]) == pytest.approx(float(p), rel=1e-5)
    assert float(logs["kl"]) == pytest.approx(float(post.kl().mean()), rel=1e-4)
    # weight 0: the perceptual network is never built or used
    vae.config.perceptual_weight = 0.0
    _, logs0 = vae_loss(vae, images, step=0)
    assert "perceptual" not in logs0


def test_a_few_adamw_steps_lower_the_loss(images) -> None:
    torch.manual_seed(0)
    vae = VAE(tiny_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        torch.manual_seed(100 + step)
        loss, _ = vae_loss(vae, images, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_gan_term_uses_the_adaptive_weight_at_the_decoder_output(images) -> None:
    cfg = tiny_config(kl_weight=1e-3, gan=GANConfig(weight=0.5, start_step=3, disc_channels=8, disc_layers=2))
    torch.manual_seed(0)
    vae = VAE(cfg)
    crit = VAECriterion(cfg)
    assert vae.last_layer() is vae.decoder.conv_out.weight
    assert isinstance(crit.recon.discriminator, NLayerDiscriminator)
    torch.manual_seed(5)
    before, logs = crit(vae, images, step=2)  # GAN not started: the plain objective
    assert "gan_g" not in logs and crit.discriminator_loss(2) is None
    torch.manual_seed(5)
    plain, _ = VAECriterion(tiny_config(kl_weight=1e-3))(vae, images, step=2)
    assert torch.equal(before, plain)
    torch.manual_seed(5)
    loss, logs = crit(vae, images, step=3)
    torch.manual_seed(5)
    recon, post = vae(images)
    rec = (recon - images).abs().mean()
    g = generator_loss(crit.recon.discriminator(recon))
    w_rec = torch.autograd.grad(rec, vae.last_layer(), retain_graph=True)[0]
    w_g = torch.autograd.grad(g, vae.last_layer(), retain_graph=True)[0]
    adaptive = w_rec.norm() / (w_g.norm() + 1e-4)
    expected = rec + 1e-3 * post.kl().mean() / images[0].numel() + 0.5 * adaptive * g
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert float(logs["gan_adaptive"]) == pytest.approx(float(adaptive), rel=1e-5)
    assert float(logs["gan_g"]) == pytest.approx(float(g.detach()), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in crit.parameters())  # the generator term leaves D's grads alone
    d_loss, d_logs = crit.discriminator_loss(3)
    d_loss.backward()
    assert all(p.grad is not None for p in crit.parameters()) and vae.last_layer().grad is not None
    assert {"gan_d", "logits_real", "logits_fake"} <= set(d_logs)
    with pytest.raises(ConfigError, match="gan.weight"):
        VAEConfig(gan={"weight": -1})


def test_a_few_steps_with_the_gan_lower_the_reconstruction_loss(images) -> None:
    cfg = tiny_config(gan=GANConfig(weight=0.1, start_step=0, disc_channels=8, disc_layers=2))
    torch.manual_seed(0)
    vae, crit = VAE(cfg), VAECriterion(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    d_opt = torch.optim.AdamW(crit.discriminator_parameters(), lr=1e-3, betas=(0.5, 0.9))
    l1 = []
    for step in range(40):
        torch.manual_seed(100 + step)
        loss, logs = crit(vae, images, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        d_loss, _ = crit.discriminator_loss(step)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        l1.append(float(logs["l1"]))
    assert sum(l1[-5:]) / 5 < 0.8 * sum(l1[:5]) / 5, l1


def test_paper_recipe_loads() -> None:
    spec = get_spec("vae")
    recipe = load_recipe("vae", spec.paper_recipe)
    m = recipe.model
    assert (m.image_size, m.base_channels, m.ch_mult) == (256, 128, (1, 1, 2, 2, 4))
    assert (m.num_res_blocks, m.z_channels) == (2, 32)
    assert (m.perceptual_weight, m.kl_weight, m.gan.weight, m.gan.start_step) == (1.0, 1e-6, 0.5, 50001)
    assert recipe.train.precision == "bf16" and recipe.data.image_size == 256
    # the CPU default stays GAN-free (its checkpoint is unchanged)
    assert not load_recipe("vae").model.gan.enabled


SMOKE = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.tensorboard=false",
         "data.stats_images=8", "data.stats_batch_size=8", "model.base_channels=8", "model.ch_mult=[1,2]",
         "model.norm_groups=4"]


def test_train_tokenizer_with_the_gan_smoke(tmp_path) -> None:
    tok = train_tokenizer("vae", overrides=SMOKE + ["model.gan.weight=0.5", "model.gan.disc_channels=8"],
                          run_dir=tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (ckpt / "criterion.safetensors").is_file()
    assert torch.load(ckpt / "state.pt", weights_only=True)["disc_optimizer"]["state"]
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"gan_g", "gan_adaptive", "gan_d", "logits_real", "logits_fake"} <= set(rows[-1])
    again = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert again.config.gan.weight == 0.5
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(again.encode(x), tok.encode(x))


def test_cli_train_tokenizer(tmp_path, capsys) -> None:
    from manifold_lab.cli import main

    out = tmp_path / "saved"
    args = ["train-tokenizer", "--tokenizer", "vae", "--run-dir", str(tmp_path / "run"), "--out", str(out),
            "--no-progress"]
    for item in SMOKE:
        args += ["--set", item]
    main(args)
    printed = capsys.readouterr().out
    assert f"tokenizer saved in {out}" in printed and (out / "config.json").is_file()
    assert load_tokenizer(out).latent_shape == (4, 16, 16)
    with pytest.raises(SystemExit) as exc:
        main(["train-tokenizer", "--tokenizer", "vae", "--run-dir", str(tmp_path / "bad"), "--set", "model.bogus=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.bogus" in err and "z_channels" in err and "gan" in err
    with pytest.raises(SystemExit) as exc:
        main(["train-tokenizer", "--tokenizer", "vae", "--paper", "--config", "x.yaml"])
    assert exc.value.code == 2
