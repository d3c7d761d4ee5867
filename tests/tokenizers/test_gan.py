"""The shared GAN parts (manifold_lab.train.gan) and ReconstructionLoss's GAN path, against hand-computed
answers: PatchGAN layout and init, hinge / non-saturating losses, the adaptive weight, frozen D grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab.errors import ConfigError
from manifold_lab.tokenizers.losses import ReconstructionLoss, TokenizerCriterion
from manifold_lab.train.gan import (GANConfig, NLayerDiscriminator, adaptive_weight, discriminator_loss,
                                    frozen_parameters, generator_loss)


def test_patchgan_layout_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, channels=64, layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    # pix2pix / taming: 4x4 convs, strides 2,2,2,1 then the 1-channel head; widths 64,128,256,512,1
    assert [c.kernel_size for c in convs] == [(4, 4)] * 5
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(isinstance(m, nn.GroupNorm) for m in d.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)))
    assert [m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)] == [0.2] * 4
    w = torch.cat([c.weight.detach().flatten() for c in convs])
    assert abs(float(w.mean())) < 1e-3 and float(w.std()) == pytest.approx(0.02, rel=0.02)
    assert d(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # 70x70 patches of a 256 image
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    bn = NLayerDiscriminator(3, channels=8, layers=2, norm="batch")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2
    with pytest.raises(ConfigError, match="disc_norm"):
        GANConfig(weight=1.0, disc_norm="layer")


def test_losses_known_answers():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # hinge D: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 * (mean[0, .5, 2] + mean[0, 1, 2])
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert float(generator_loss(fake, "hinge")) == pytest.approx(-(-2 + 0 + 1) / 3)
    ns = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert float(discriminator_loss(real, fake, "non-saturating")) == pytest.approx(float(ns))
    assert float(generator_loss(fake, "non-saturating")) == pytest.approx(float(F.softplus(-fake).mean()))


def test_adaptive_weight_is_the_clamped_detached_gradient_norm_ratio():
    w = nn.Parameter(torch.ones(2, 2))
    a, b = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    rec, g = (w * a).sum(), (w * b).sum()  # gradients a and b: norms 5 and 1
    weight = adaptive_weight(rec, g, w, max_weight=100.0)
    assert float(weight) == pytest.approx(5.0 / (1.0 + 1e-4)) and not weight.requires_grad
    assert w.grad is None  # autograd.grad never writes .grad
    assert float(adaptive_weight((w * a).sum(), (w * 0.0).sum(), w, max_weight=7.0)) == 7.0  # clamped
    rec.backward()  # the graph was retained
    assert torch.equal(w.grad, a)


def test_frozen_parameters_keeps_generator_gradients_out_of_the_discriminator():
    d = nn.Linear(3, 1)
    x = torch.randn(4, 3, requires_grad=True)
    with frozen_parameters(d):
        out = d(x).sum()
    assert d.weight.requires_grad  # restored at once
    out.backward()  # ...but the graph recorded at forward time has no edge to D's parameters
    assert d.weight.grad is None and x.grad is not None


def _decoder_and_pair(seed=0):
    torch.manual_seed(seed)
    dec = nn.Conv2d(4, 3, 3, padding=1)
    x, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 16, 16)
    return dec, x, z


def test_reconstruction_loss_gan_path():
    off = ReconstructionLoss(1.0, 0.0)
    assert not hasattr(off, "discriminator") and off.state_dict() == {} and off.discriminator_optim_config() is None
    gan = GANConfig(weight=0.5, start_step=2, disc_channels=8, disc_layers=2, lr=3e-4)
    rl = ReconstructionLoss(1.0, 0.0, gan=gan)
    dec, x, z = _decoder_and_pair()
    loss, logs = rl(x, dec(z), step=1, last_layer=dec.weight)  # before start_step
    assert set(logs) == {"l1"} and rl.discriminator_loss(1) is None
    # from start_step on: rec + weight * adaptive * g, D's grads untouched by the generator's backward
    recon = dec(z)
    loss, logs = rl(x, recon, step=2, last_layer=dec.weight)
    rec = (recon - x).abs().mean()
    g = -rl.discriminator(recon).mean()
    w = adaptive_weight(rec, g, dec.weight)
    assert torch.allclose(loss, rec + 0.5 * w * g, rtol=1e-6)
    assert float(logs["gan_adaptive"]) == pytest.approx(float(w)) and "gan_g" in logs
    loss.backward()
    assert all(p.grad is None for p in rl.parameters())
    # adaptive off or no last layer: weight 1
    no_adapt = ReconstructionLoss(1.0, 0.0, gan=GANConfig(weight=0.5, adaptive=False, disc_channels=8, disc_layers=2))
    assert float(no_adapt(x, dec(z), 0, last_layer=dec.weight)[1]["gan_adaptive"]) == 1.0
    assert float(rl(x, dec(z), 5, last_layer=None)[1]["gan_adaptive"]) == 1.0
    # the discriminator trains on the remembered pairs, oldest first, on detached tensors
    assert rl.pending_discriminator_batches() == 2  # steps 2 and 5 (step 1 was before start_step)
    d_loss, d_logs = rl.discriminator_loss(5)
    real, fake = rl.discriminator(x), rl.discriminator(recon.detach())
    assert torch.allclose(d_loss, discriminator_loss(real, fake), rtol=1e-6)
    assert float(d_logs["logits_real"]) == pytest.approx(float(real.detach().mean()))
    d_loss.backward()
    assert all(p.grad is not None for p in rl.parameters())
    rl.clear_discriminator_batches()
    assert rl.discriminator_loss(5) is None
    with torch.no_grad():  # evaluation forwards are not remembered
        rl(x, dec(z), 5, last_layer=dec.weight)
    assert rl.pending_discriminator_batches() == 0
    opt = rl.discriminator_optim_config()
    assert (opt.lr, opt.betas, opt.schedule, opt.weight_decay) == (3e-4, (0.5, 0.9), "constant", 0.0)


def test_tokenizer_criterion_delegates_the_gan_hooks():
    rl = ReconstructionLoss(1.0, 0.0, gan=GANConfig(weight=1.0, disc_channels=8, disc_layers=2))
    crit = TokenizerCriterion(rl)
    assert crit.discriminator_parameters() == list(rl.discriminator.parameters())
    assert crit.discriminator_optim_config() == rl.discriminator_optim_config()
    dec, x, z = _decoder_and_pair(1)
    rl(x, dec(z), 0, last_layer=dec.weight)
    assert crit.pending_discriminator_batches() == 1 and crit.discriminator_loss(0) is not None
    assert set(crit.state_dict()) == {f"recon.{k}" for k in rl.state_dict()}
