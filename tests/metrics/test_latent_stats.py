"""Per-channel latent statistics: values, dead channels, merging and NaN rejection."""

import numpy as np
import pytest
import torch

from manifold_lab.errors import ManifoldLabError
from manifold_lab.metrics import ChannelStats
from manifold_lab.metrics.latent_stats import _merge


def _latents(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(20, 4, 3, 3, generator=g, dtype=torch.float64)
    z = z * torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)[None, :, None, None]
    z[:, 3] = 7.0 + 1e-5 * z[:, 3]  # a nearly constant channel
    return z


def test_values_match_numpy():
    z = _latents()
    st = ChannelStats(4)
    st.update(z)
    res = st.compute()
    per = z.transpose(0, 1).reshape(4, -1).numpy()
    np.testing.assert_allclose(res["mean"], per.mean(1), rtol=1e-12)
    np.testing.assert_allclose(res["std"], per.std(1), rtol=1e-9)
    np.testing.assert_allclose(res["min"], per.min(1))
    np.testing.assert_allclose(res["max"], per.max(1))
    assert res["global_mean"] == pytest.approx(per.mean(), rel=1e-12)
    assert res["global_std"] == pytest.approx(per.std(), rel=1e-12)
    assert res["dead_channels"] == [3] and res["dead_fraction"] == 0.25
    assert (res["n_images"], res["values_per_channel"], res["channels"]) == (20, 180, 4)


def test_batches_give_the_same_result_as_one_pass():
    z = _latents(1)
    one, many = ChannelStats(4), ChannelStats(4)
    one.update(z)
    for i in range(0, 20, 3):
        many.update(z[i:i + 3])
    a, b = one.compute(), many.compute()
    np.testing.assert_allclose(b["mean"], a["mean"], rtol=1e-12)
    np.testing.assert_allclose(b["std"], a["std"], rtol=1e-9)  # the near-constant channel too
    f32 = ChannelStats(4)
    f32.update(z.float())  # float32 latents are accepted (statistics kept in float64)
    np.testing.assert_allclose(f32.compute()["std"][:3], a["std"][:3], rtol=1e-5)


def test_chan_merge_is_exact_with_a_large_offset():
    x = 1e6 + np.random.default_rng(2).normal(size=1000) * 1e-3
    n_a, m_a, s_a = (torch.tensor([400.0], dtype=torch.float64), torch.tensor([x[:400].mean()]),
                     torch.tensor([((x[:400] - x[:400].mean()) ** 2).sum()]))
    n_b, m_b, s_b = (torch.tensor([600.0], dtype=torch.float64), torch.tensor([x[400:].mean()]),
                     torch.tensor([((x[400:] - x[400:].mean()) ** 2).sum()]))
    n, m, m2 = _merge(n_a, m_a, s_a, n_b, m_b, s_b)
    assert float((m2 / n).sqrt()) == pytest.approx(x.std(), rel=1e-6)


def test_rejects_non_finite_and_wrong_shapes():
    z = _latents()
    z[0, 0, 0, 0] = float("nan")
    z[1, 1, 1, 1] = float("inf")
    with pytest.raises(ManifoldLabError, match="contain 2 NaN/inf"):
        ChannelStats(4).update(z)
    with pytest.raises(ManifoldLabError, match="have 4 channels, expected 5"):
        ChannelStats(5).update(_latents())
    with pytest.raises(ManifoldLabError, match="no latents"):
        ChannelStats(4).compute()
