"""LPC known answers with linear decoders, plus the straight-path Lipschitz probe."""

import pytest
import torch

from manifold_lab.errors import ManifoldLabError
from manifold_lab.metrics import LPCAccumulator, lpc, lpc_weights, path_lipschitz

RHOS = (0.1, 0.5, 1.0, 2.0)


def l2(x, y):
    return (x - y).flatten(1).norm(dim=1)


def l1(x, y):
    return (x - y).flatten(1).abs().sum(dim=1)


def encode(x):  # a 2x2 average pool "tokenizer": (B,3,8,8) -> (B,3,4,4)
    return torch.nn.functional.avg_pool2d(x, 2)


def scaled_decoder(c):
    def decode(z):
        return c * torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")
    return decode


@pytest.fixture
def images():
    return torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_decoder_that_ignores_its_input_gives_zero(images):
    res = lpc(encode, lambda z: torch.zeros(z.shape[0], 3, 8, 8), images, l2, seed=0, batch_size=4)
    assert res["lpc"] == 0.0 and all(v == 0.0 for v in res["per_rho"].values())
    assert res["n_images"] == 10 and res["n_directions"] == 1 and res["rhos"] == list(RHOS)


def test_linear_decoder_with_l2_has_closed_form(images):
    # nearest upsampling by 2 scales every vector's L2 norm by exactly 2, so
    # P(D(z + eps u), D(z)) = 2 c eps ||u|| = 2 c rho ||z||, whatever direction u is drawn
    z_norms = encode(images).flatten(1).double().norm(dim=1)
    for c in (1.0, 2.0, 4.0):
        res = lpc(encode, scaled_decoder(c), images, l2, rhos=RHOS, batch_size=3, directions=2)
        for rho in RHOS:
            assert res["per_rho"][rho] == pytest.approx(2 * c * rho * z_norms.mean().item(), rel=1e-5)
        w = lpc_weights(RHOS)
        assert res["lpc"] == pytest.approx(sum(wi * 2 * c * r * z_norms.mean().item() for wi, r in zip(w, RHOS)),
                                           rel=1e-5)


def test_lpc_is_proportional_to_the_decoder_scale_with_l1(images):
    values = [lpc(encode, scaled_decoder(c), images, l1, seed=3)["lpc"] for c in (1.0, 2.0, 4.0)]
    assert values[1] / values[0] == pytest.approx(2.0, rel=1e-6)
    assert values[2] / values[0] == pytest.approx(4.0, rel=1e-6)


def test_weights_are_inverse_rho_and_sum_to_one(images):
    res = lpc(encode, scaled_decoder(1.0), images, l1)
    w = res["weights"]
    assert sum(w.values()) == pytest.approx(1.0)
    assert w[0.1] / w[2.0] == pytest.approx(20.0)
    assert lpc_weights([1.0, 1.0]) == [0.5, 0.5]


def test_seeded_directions_are_reproducible(images):
    dec = lambda z: torch.tanh(3 * scaled_decoder(1.0)(z)) ** 2  # noqa: E731 - direction-dependent
    a = lpc(encode, dec, images, l1, seed=1)
    b = lpc(encode, dec, images, l1, seed=1)
    c = lpc(encode, dec, images, l1, seed=2)
    assert a["lpc"] == b["lpc"] and a["lpc"] != c["lpc"]


def test_accumulator_equals_lpc_and_accepts_lpips_shaped_distances(images):
    lpips_like = lambda x, y: l1(x, y)[:, None, None, None]  # noqa: E731 - LPIPS returns (B,1,1,1)
    acc = LPCAccumulator(rhos=(0.5, 1.0), seed=4)
    for i in range(0, 10, 5):
        acc.update(encode(images[i:i + 5]), scaled_decoder(1.5), lpips_like)
    res = acc.compute()
    ref = lpc(encode, scaled_decoder(1.5), images, l1, rhos=(0.5, 1.0), seed=4, batch_size=5)
    assert res["lpc"] == pytest.approx(ref["lpc"], rel=1e-12)
    assert res["distance"] == "<lambda>"


def test_path_lipschitz_of_a_linear_decoder_is_its_gain():
    g = torch.Generator().manual_seed(5)
    za, zb = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    zb[2] = za[2]
    out = path_lipschitz(za, zb, scaled_decoder(3.0), l2, steps=5)
    assert out.shape == (4,)
    assert torch.allclose(out[[0, 1, 3]], torch.full((3,), 6.0, dtype=torch.float64), rtol=1e-5)
    assert torch.isnan(out[2])  # identical endpoints have no path
    bent = path_lipschitz(za, zb, lambda z: z.abs(), l2, steps=16, reduce="max")
    assert (bent[[0, 1, 3]] <= 1.0 + 1e-5).all()  # |.| is 1-Lipschitz


def test_bad_inputs(images):
    with pytest.raises(ManifoldLabError, match="rhos must be"):
        LPCAccumulator(rhos=(0.1, -1.0))
    with pytest.raises(ManifoldLabError, match="one value per sample"):
        lpc(encode, scaled_decoder(1.0), images, lambda x, y: l1(x, y).sum())
    with pytest.raises(ManifoldLabError, match=r"lpc: images must be \(N,3,H,W\)"):
        lpc(encode, scaled_decoder(1.0), images[0], l1)
    with pytest.raises(ManifoldLabError, match="no latents"):
        LPCAccumulator().compute()
