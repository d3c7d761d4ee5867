"""SSC known answers, agreement with scikit-learn's spectral clustering, and its plumbing."""

import numpy as np
import pytest
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import normalized_mutual_info_score

from manifold_lab.errors import ManifoldLabError
from manifold_lab.metrics import (SSCAccumulator, downsample_segments, ssc, ssc_clusters, ssc_per_image,
                                  ssc_report)
from manifold_lab.metrics.ssc import kmeans_batched, nmi_batched, normalized_affinity, top_eigenvectors


@pytest.fixture(autouse=True)
def _one_thread():
    """Batched eigh under 2 intra-op threads crawls when the shared CPU is busy; 1 thread is steady."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _layouts(b, h, w, kmin=2, kmax=4, seed=0):
    """Random Voronoi layouts with kmin..kmax segments and random (non-contiguous) segment ids."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    segs = torch.zeros(b, h, w, dtype=torch.long)
    for i in range(b):
        while True:
            k = int(torch.randint(kmin, kmax + 1, (1,), generator=g))
            c = torch.rand(k, 2, generator=g) * torch.tensor([h, w])
            lab = ((yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2).argmin(0)
            if lab.unique().numel() == k:
                break
        ids = torch.randperm(20, generator=g)[:k] * 3 + 1
        segs[i] = ids[lab]
    return segs


def _noisy_latents(segs, c=16, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = segs.shape[0]
    _, inv = segs.unique(return_inverse=True)
    protos = torch.randn(b, int(inv.max()) + 1, c, generator=g)
    z = protos[torch.arange(b)[:, None, None], inv]  # (B, h, w, C)
    return z.permute(0, 3, 1, 2) + noise * torch.randn(b, c, *segs.shape[1:], generator=g)


def test_one_hot_tokens_of_the_segments_score_one():
    segs = _layouts(16, 8, 8, seed=1)
    _, inv = segs.unique(return_inverse=True)
    z = torch.nn.functional.one_hot(inv, int(inv.max()) + 1).permute(0, 3, 1, 2).float()
    values = ssc_per_image(z, segs)
    assert torch.allclose(values, torch.ones(16, dtype=torch.float64), atol=1e-12)
    assert ssc(z, segs) == pytest.approx(1.0, abs=1e-12)


def test_agrees_with_sklearn_spectral_clustering_on_noisy_cases():
    segs = _layouts(24, 8, 8, seed=2)
    z = _noisy_latents(segs, noise=1.2, seed=3)
    ours = ssc_per_image(z, segs, sigma=0.1, seed=0).numpy()
    ref = []
    for i in range(24):
        t = z[i].reshape(16, -1).T.double()
        t = t / t.norm(dim=1, keepdim=True)
        gram = (t @ t.T).numpy()
        aff = np.exp((gram - 1.0) / 0.1)
        np.fill_diagonal(aff, 0.0)
        k = int(segs[i].unique().numel())
        lab = SpectralClustering(k, affinity="precomputed", assign_labels="kmeans",
                                 random_state=0).fit_predict(aff)
        ref.append(normalized_mutual_info_score(segs[i].reshape(-1).numpy(), lab, average_method="geometric"))
    ref = np.array(ref)
    assert 0.3 < ref.mean() < 0.95  # a genuinely noisy case, not a trivial one
    # the two algorithms differ in details (sklearn: D^-1/2-scaled embedding without row
    # normalisation, greedy k-means++), so single images may differ; the dataset mean must not
    assert abs(ours.mean() - ref.mean()) < 0.05
    assert np.corrcoef(ours, ref)[0, 1] > 0.8


def test_nmi_matches_sklearn_including_degenerate_cases():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(6, 30))
    pred = rng.integers(0, 4, size=(6, 30))
    pred[0] = 0  # a single predicted cluster: NMI 0
    pred[1] = truth[1]  # identical: 1
    pred[2] = (truth[2] + 1) % 3  # permuted ids: 1
    truth[3], pred[3] = 0, 0  # both single-cluster: 1 (sklearn's convention)
    ours = nmi_batched(torch.as_tensor(truth), torch.as_tensor(pred)).numpy()
    ref = [normalized_mutual_info_score(t, p, average_method="geometric") for t, p in zip(truth, pred)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_chebyshev_subspace_matches_eigh_and_falls_back():
    segs = _layouts(12, 16, 16, seed=12)
    z = _noisy_latents(segs, noise=1.0, seed=13)
    tokens = z.reshape(12, 16, -1).transpose(1, 2)
    m, v1 = normalized_affinity(tokens, 0.1)
    exact = torch.linalg.eigh(m.double())[1][:, :, -3:]
    fast, n_fallback = top_eigenvectors(m, v1, 3)
    assert n_fallback == 0
    # same 3-dim subspace: all principal-angle cosines ~1
    cos = torch.linalg.svdvals(exact.transpose(1, 2) @ fast.double())
    assert cos.min().item() > 1 - 1e-6
    forced, n_fallback = top_eigenvectors(m, v1, 3, max_rounds=0)
    assert n_fallback == 12
    assert torch.linalg.svdvals(exact.transpose(1, 2) @ forced.double()).min().item() > 1 - 1e-6  # float32 out


def test_batched_kmeans_separates_blobs_like_sklearn():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(14)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    pts = torch.stack([centres.repeat_interleave(20, 0) + 0.5 * torch.randn(60, 2, generator=g, dtype=torch.float64)
                       for _ in range(4)])
    labels, inertia = kmeans_batched(pts, 3, n_init=5, seed=0)
    truth = torch.arange(3).repeat_interleave(20)
    for i in range(4):
        assert normalized_mutual_info_score(truth, labels[i]) == pytest.approx(1.0)
        ref = KMeans(3, n_init=5, random_state=0).fit(pts[i].numpy()).inertia_
        assert inertia[i].item() == pytest.approx(ref, rel=1e-9)


def test_clusters_and_reported_nmi_are_consistent():
    segs = _layouts(6, 8, 8, seed=4)
    z = _noisy_latents(segs, noise=0.8, seed=5)
    clusters, nmi = ssc_clusters(z, segs)
    assert clusters.shape == segs.shape
    for i in range(6):
        assert int(clusters[i].unique().numel()) <= int(segs[i].unique().numel())
        ref = normalized_mutual_info_score(segs[i].reshape(-1), clusters[i].reshape(-1), average_method="geometric")
        assert nmi[i].item() == pytest.approx(ref, abs=1e-12)


def test_single_segment_images_are_skipped():
    segs = _layouts(4, 8, 8, seed=6)
    segs[1] = 5
    segs[3] = 0
    z = _noisy_latents(segs, noise=0.3, seed=7)
    values = ssc_per_image(z, segs)
    assert torch.isnan(values[[1, 3]]).all() and not torch.isnan(values[[0, 2]]).any()
    rep = ssc_report(z, segs, sigma=0.2, seed=3)
    assert rep["n_images"] == 2 and rep["n_skipped"] == 2
    assert rep["mean"] == pytest.approx(values[[0, 2]].mean().item())
    assert (rep["sigma"], rep["seed"], rep["n_init"]) == (0.2, 3, 10)
    assert np.isnan(ssc(z[[1, 3]], segs[[1, 3]]))


def test_per_image_values_do_not_depend_on_batching():
    segs = _layouts(12, 8, 8, seed=8)
    z = _noisy_latents(segs, noise=1.0, seed=9)
    whole = ssc_per_image(z, segs)
    parts = torch.cat([ssc_per_image(z[:5], segs[:5]), ssc_per_image(z[5:], segs[5:])])
    assert torch.allclose(whole, parts, atol=1e-12)
    acc_a, acc_b, acc = SSCAccumulator(), SSCAccumulator(), SSCAccumulator()
    acc_a.update(z[:7], segs[:7])
    acc_b.update(z[7:], segs[7:])
    acc.update(z, segs)
    merged = torch.cat([acc_a.values(), acc_b.values()])
    assert torch.allclose(merged, acc.values(), atol=1e-12)
    assert acc.compute()["mean"] == pytest.approx(whole.mean().item())


def test_small_sigma_stays_finite():
    segs = _layouts(4, 8, 8, seed=10)
    z = _noisy_latents(segs, noise=0.5, seed=11)
    values = ssc_per_image(z, segs, sigma=1e-3)
    assert torch.isfinite(values).all()


def test_downsample_segments_majority_vote():
    m = torch.tensor([[[1, 1, 2, 2],
                       [1, 7, 2, 2],
                       [3, 3, 5, 9],
                       [3, 4, 9, 5]]])
    out = downsample_segments(m, (2, 2))
    # cells: {1,1,1,7} -> 1, {2,2,2,2} -> 2, {3,3,3,4} -> 3, {5,9,9,5} tie -> smallest id 5
    assert out.tolist() == [[[1, 2], [3, 5]]]
    assert downsample_segments(m[:, None], (4, 4)).tolist() == m.tolist()
    assert downsample_segments(np.asarray(m, dtype=np.float32), (1, 1)).tolist() == [[[2]]]  # 2 occurs 4 times
    with pytest.raises(ValueError, match="not a multiple"):
        downsample_segments(m, (3, 2))


def test_bad_inputs():
    with pytest.raises(ManifoldLabError, match=r"ssc: latents must be \(B,C,h,w\), got shape \(3, 4\)"):
        ssc(torch.zeros(3, 4), torch.zeros(3, 2, 2))
    with pytest.raises(ManifoldLabError, match="downsample_segments"):
        ssc(torch.randn(2, 4, 4, 4), torch.zeros(2, 8, 8, dtype=torch.long))
    z = torch.randn(2, 4, 4, 4)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ManifoldLabError, match="1 NaN/inf"):
        ssc(z, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ManifoldLabError, match="integer segment ids"):
        ssc(torch.randn(2, 4, 4, 4), torch.full((2, 4, 4), 0.5))
