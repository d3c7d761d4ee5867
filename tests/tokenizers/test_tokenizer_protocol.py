"""The Tokenizer protocol, shape contracts, one-line validation errors and latent statistics."""

from __future__ import annotations

import pytest
import torch

from manifold_lab.errors import ManifoldLabError
from manifold_lab.tokenizers import VAE, LatentStats, Tokenizer, VAEConfig

from tokenizer_helpers import tiny_config


def test_vae_satisfies_protocol_and_default_shape() -> None:
    vae = VAE()  # the CPU recipe's defaults: 32x32 -> 4x8x8
    assert isinstance(vae, Tokenizer)
    assert vae.name == "vae" and vae.image_size == 32
    assert vae.latent_shape == (4, 8, 8)
    assert not isinstance(object(), Tokenizer)


def test_encode_decode_shapes_match_latent_shape(tiny_vae, images) -> None:
    with torch.no_grad():
        z = tiny_vae.encode(images)
        assert tuple(z.shape) == (images.shape[0], *tiny_vae.latent_shape)
        x = tiny_vae.decode(z)
    assert x.shape == images.shape
    # another supported resolution (fully convolutional): 32x32 at f2 -> 16x16 latent
    with torch.no_grad():
        z32 = tiny_vae.encode(torch.zeros(1, 3, 32, 32))
    assert tuple(z32.shape) == (1, 4, 16, 16)


def test_encode_is_the_deterministic_posterior_mean(tiny_vae, images) -> None:
    with torch.no_grad():
        z1, z2 = tiny_vae.encode(images), tiny_vae.encode(images)
        post = tiny_vae.encode_posterior(images)
        sampled, _ = tiny_vae(images, sample=True)
        mean_recon, _ = tiny_vae(images, sample=False)
    assert torch.equal(z1, z2)
    assert torch.equal(z1, post.mean)
    assert torch.allclose(mean_recon, tiny_vae.decode(z1), atol=1e-6)
    assert not torch.allclose(sampled, mean_recon)


@pytest.mark.parametrize("bad, fragment", [
    (torch.zeros(2, 1, 16, 16), "got (2,1,16,16)"),
    (torch.zeros(3, 16, 16), "got (3,16,16)"),
    (torch.zeros(2, 3, 14, 14), "got (2,3,14,14)"),  # checked on an f4 model: 14 is not a multiple of 4
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "uint8"),
])
def test_bad_images_raise_one_line(tiny_vae, bad, fragment) -> None:
    if bad.ndim == 4 and bad.shape[2] == 14:
        tok = VAE(tiny_config(ch_mult=(1, 2, 2)))  # f4: 14 is not a multiple of 4
    else:
        tok = tiny_vae
    with pytest.raises(ManifoldLabError) as err:
        tok.encode(bad)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("vae: expects (B,3,16,16)") and fragment in msg


def test_bad_latents_raise_one_line(tiny_vae) -> None:
    with pytest.raises(ManifoldLabError) as err:
        tiny_vae.decode(torch.zeros(2, 3, 8, 8))
    msg = str(err.value)
    assert "\n" not in msg and "decode expects (B,4,8,8)" in msg and "got (2,3,8,8)" in msg
    with pytest.raises(ManifoldLabError):
        tiny_vae.decode(torch.zeros(2, 4, 2, 2))  # 2x2 latent -> 4x4 image, below the 8 px minimum


def test_supports_resolution_rule() -> None:
    vae = VAE(VAEConfig(ch_mult=(1, 2, 2)))  # f4
    assert [s for s in range(1, 41) if vae.supports_resolution(s)] == [8, 12, 16, 20, 24, 28, 32, 36, 40]
    vae8 = VAE(tiny_config(ch_mult=(1, 2, 2, 2), image_size=16))  # f8
    assert vae8.supports_resolution(16) and not vae8.supports_resolution(12) and vae8.latent_shape == (4, 2, 2)


def test_image_size_must_be_supported() -> None:
    with pytest.raises(ManifoldLabError, match="image_size 18 is not supported"):
        VAE(tiny_config(image_size=18, ch_mult=(1, 2, 2)))


def test_latent_stats_normalize_denormalize_inverse(tiny_vae, images) -> None:
    stats = LatentStats(torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([2.0, 0.5, 1.0, 4.0]), "hand-set for a test")
    tiny_vae.set_latent_stats(stats)
    with torch.no_grad():
        z = tiny_vae.encode(images)
    n = tiny_vae.normalize(z)
    # known answer per channel: (z - mean) / std
    assert torch.allclose(n[:, 0], (z[:, 0] - 0.5) / 2.0)
    assert torch.allclose(n[:, 3], z[:, 3] / 4.0)
    assert torch.allclose(tiny_vae.denormalize(n), z, atol=1e-6)
    assert torch.allclose(stats.denormalize(stats.normalize(z)), z, atol=1e-6)
    assert torch.allclose(stats.normalize(z), n)
    got = tiny_vae.latent_stats
    assert torch.equal(got.mean, stats.mean) and torch.equal(got.std, stats.std) and got.how == "hand-set for a test"


def test_default_stats_are_identity(tiny_vae, images) -> None:
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(tiny_vae.normalize(z), z)
    assert "not computed" in tiny_vae.latent_stats.how


def test_latent_stats_validation() -> None:
    with pytest.raises(ManifoldLabError, match="std finite and > 0"):
        LatentStats(torch.zeros(2), torch.tensor([1.0, 0.0]), "x")
    with pytest.raises(ManifoldLabError, match="channels"):
        LatentStats(torch.zeros(2), torch.ones(3), "x")
    with pytest.raises(ManifoldLabError, match="3 channels but the latent has 4"):
        VAE(tiny_config()).set_latent_stats(LatentStats.identity(3))
    with pytest.raises(ManifoldLabError, match="single line"):
        LatentStats.identity(2, how="two\nlines")
