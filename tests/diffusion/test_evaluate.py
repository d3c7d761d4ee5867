"""gFID evaluation: FID closed forms, ADM npz files, references of every kind, backbone checks, torchrun sharding."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from manifold_lab import distributed
from manifold_lab.diffusion.adm_npz import (images_to_uint8, read_reference_npz, read_samples_npz, uint8_to_images,
                                            write_samples_npz)
from manifold_lab.diffusion.evaluate import (EvalConfig, Reference, build_backbone, evaluate_samples, gaussian,
                                             load_reference, reference_stats, save_reference, subset_indices)
from manifold_lab.encoders.fid_backbones import FIDBackbone
from manifold_lab.errors import ConfigError, ManifoldLabError
from manifold_lab.metrics import frechet_distance

MOBILE = EvalConfig(backbone="mobilenet_v2", device="cpu", batch_size=8)


class ToyBackbone(FIDBackbone):
    """A cheap stand-in network (12-d pooled colours + a fixed 5-class head) for the mechanics tests:
    with 12-d features the FID matrix square root is instant (MobileNet's 1280-d one takes seconds)."""

    name, dim, has_logits = "toy-pool@2", 12, True

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(12, 5)
        with torch.no_grad():
            self.head.weight.copy_(torch.linspace(-1, 1, 60).view(5, 12) * 4)
            self.head.bias.zero_()
        self._freeze()

    @torch.no_grad()
    def features_and_logits(self, images):
        self._check(images, self.name)
        f = torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1) * 10
        return f, self.head(f)


@pytest.fixture(scope="module")
def mobilenet():
    return build_backbone("mobilenet_v2", "cpu")


def _images(n: int = 12, size: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth random colour images, uint8 NHWC (distinct enough for the backbones)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return images_to_uint8(x)


# ---- FID closed forms -----------------------------------------------------------------------------


def test_fid_closed_form_full_2x2_covariances() -> None:
    """2x2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))) for non-commuting full covariances."""
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    closed = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    assert frechet_distance(mu1, s1, mu2, s2)["fid"] == pytest.approx(closed, rel=1e-12)
    a, b = np.array([1.0, 4.0]), np.array([9.0, 1.0])  # diagonal: sum (sqrt a - sqrt b)^2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b))["fid"] == pytest.approx(
        float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()), rel=1e-12)


def test_gaussian_of_samples_gives_the_closed_form_and_zero_for_a_set_with_itself() -> None:
    rng = np.random.default_rng(0)
    s1 = np.array([[2.0, 0.8, 0.0], [0.8, 1.0, 0.2], [0.0, 0.2, 0.5]])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -0.5])
    x = torch.as_tensor(rng.multivariate_normal(mu1, s1, size=20000), dtype=torch.float32)
    mu, sigma = gaussian(x, chunk=3000)
    np.testing.assert_allclose(mu, x.double().mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    closed = frechet_distance(mu1, s1, mu2, s1)["fid"]  # equal covariances: |mu1 - mu2|^2
    assert closed == pytest.approx(1.25, rel=1e-9)
    assert frechet_distance(mu, sigma, mu2, s1)["fid"] == pytest.approx(1.25, abs=0.05)
    assert frechet_distance(mu, sigma, mu, sigma)["fid"] < 1e-8
    with pytest.raises(ManifoldLabError, match="at least 2"):
        gaussian(x[:1])


# ---- ADM npz ----------------------------------------------------------------------------------------


def test_adm_npz_round_trip_is_memory_mapped(tmp_path) -> None:
    u8, labels = _images(6), np.array([3, 1, 4, 1, 5, 9])
    path = write_samples_npz(tmp_path / "s.npz", u8, labels)
    with np.load(path) as raw:  # the plain ADM layout
        assert sorted(raw.files) == ["arr_0", "arr_1"] and raw["arr_1"].dtype == np.int64
    images, lab = read_samples_npz(path)
    assert isinstance(images, np.memmap) and not images.flags.writeable
    np.testing.assert_array_equal(images, u8)
    np.testing.assert_array_equal(lab, labels)
    write_samples_npz(tmp_path / "nolabel.npz", torch.from_numpy(u8))
    assert read_samples_npz(tmp_path / "nolabel.npz")[1] is None
    np.savez_compressed(tmp_path / "c.npz", arr_0=u8)  # compressed members cannot be mapped: read into memory
    np.testing.assert_array_equal(read_samples_npz(tmp_path / "c.npz")[0], u8)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic writer left nothing behind


def test_adm_npz_greyscale_and_bad_files(tmp_path) -> None:
    grey = _images(4)[..., 0]
    for name, arr in (("nhw", grey), ("nhw1", grey[..., None])):
        np.savez(tmp_path / f"{name}.npz", arr_0=arr)
        images, _ = read_samples_npz(tmp_path / f"{name}.npz")
        assert images.shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(images, np.repeat(grey[..., None], 3, axis=-1))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "labels.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.zeros(3, np.int64))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = {"float.npz": "uint8", "nchw.npz": "channel-first", "labels.npz": "2 integer labels",
             "junk.npz": "not a readable", "missing.npz": "not found"}
    for name, msg in cases.items():
        with pytest.raises(ManifoldLabError, match=msg) as err:
            read_samples_npz(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(ManifoldLabError, match="uint8"):
        write_samples_npz(tmp_path / "x.npz", np.zeros((2, 8, 8, 3), np.float32))


def test_uint8_conversions() -> None:
    x = torch.rand(3, 3, 5, 7) * 2.4 - 1.2  # beyond [-1, 1]: clipped
    u8 = images_to_uint8(x)
    assert u8.dtype == np.uint8 and u8.shape == (3, 5, 7, 3)
    back = uint8_to_images(u8)
    assert back.shape == (3, 3, 5, 7) and back.dtype == torch.float32
    assert (back - x.clamp(-1, 1)).abs().max() <= 0.5 / 127.5 + 1e-6  # nearest level
    np.testing.assert_array_equal(images_to_uint8(back), u8)  # levels are fixed points
    assert images_to_uint8(torch.full((1, 1, 2, 2), -1.0)).shape == (1, 2, 2, 3)  # grey -> RGB
    assert int(images_to_uint8(torch.ones(1, 3, 1, 1)).min()) == 255
    with pytest.raises(ManifoldLabError, match="NaN"):
        images_to_uint8(torch.full((1, 3, 2, 2), float("nan")))


# ---- references -------------------------------------------------------------------------------------


def _adm_reference(path, with_images: bool = False):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    parts = {"mu": rng.normal(size=2048), "sigma": a @ a.T / 64, "mu_s": np.zeros(3), "sigma_s": np.eye(3)}
    if with_images:
        parts["arr_0"] = _images(3)
    np.savez(path, **parts)
    return parts


def test_adm_reference_with_inception_uses_mu_sigma_as_stored(tmp_path) -> None:
    parts = _adm_reference(tmp_path / "VIRTUAL_ref.npz", with_images=True)
    assert set(read_reference_npz(tmp_path / "VIRTUAL_ref.npz")) == {"mu", "sigma", "arr_0"}
    inception = build_backbone("inception", "cpu")
    inception.net = None  # proof that no image goes through the network: any forward would fail
    ref = reference_stats(tmp_path / "VIRTUAL_ref.npz", inception, with_features=False)
    np.testing.assert_array_equal(ref.mu, parts["mu"])
    np.testing.assert_array_equal(ref.sigma, parts["sigma"])
    assert ref.features is None and ref.n is None and ref.backbone == "inception-v3-tf-fid@299"
    assert "as stored" in ref.description


def test_adm_reference_with_mobilenet_is_refused(tmp_path, mobilenet) -> None:
    _adm_reference(tmp_path / "ref.npz")
    with pytest.raises(ManifoldLabError, match="TF-Inception pool3 statistics") as err:
        reference_stats(tmp_path / "ref.npz", mobilenet)
    assert "\n" not in str(err.value)
    write_samples_npz(tmp_path / "s.npz", _images(4))
    with pytest.raises(ManifoldLabError, match="backbone=inception"):
        evaluate_samples(tmp_path / "s.npz", str(tmp_path / "ref.npz"), MOBILE)


def test_same_images_as_reference_give_zero_fid_and_full_precision_recall(tmp_path) -> None:
    write_samples_npz(tmp_path / "s.npz", _images(12), np.arange(12) % 3)
    res = evaluate_samples(str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), MOBILE, cache_dir=tmp_path / "cache")
    assert res["fid"] == pytest.approx(0.0, abs=1e-3)
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["backbone"] == "mobilenet_v2-imagenet@128" and res["n_samples"] == res["n_reference"] == 12
    assert res["fid_sqrtm"] in ("scipy-sqrtm", "eigh") and res["pr_points"] == {"reference": 12, "samples": 12}
    assert res["inception_score_splits"] == 10 and res["inception_score"] >= 1.0
    json.dumps(res)  # JSON-ready


def test_float_samples_score_like_their_npz(tmp_path) -> None:
    toy = ToyBackbone()
    x = uint8_to_images(_images(8)) + 0.001  # off the 8-bit levels: quantised like a written file
    write_samples_npz(tmp_path / "s.npz", images_to_uint8(x))
    ref = Reference(np.zeros(12), np.eye(12), toy.name, "toy", features=torch.rand(20, 12))
    a = evaluate_samples(x.numpy(), ref, MOBILE, backbone=toy)
    b = evaluate_samples(str(tmp_path / "s.npz"), ref, MOBILE, backbone=toy)
    assert a["fid"] == b["fid"] > 1.0 and a["precision"] == b["precision"] and a["recall"] == b["recall"]
    assert a["inception_score"] == b["inception_score"] and a["samples"].startswith("float array")
    grey = evaluate_samples(x[:, :1].numpy(), ref, MOBILE, backbone=toy)  # 1 channel -> RGB
    rgb = evaluate_samples(x[:, :1].expand(-1, 3, -1, -1).numpy(), ref, MOBILE, backbone=toy)
    assert grey["fid"] == rgb["fid"] and grey["n_samples"] == 8
    with pytest.raises(ManifoldLabError, match="made with FID backbone toy-pool@2, not mobilenet_v2"):
        evaluate_samples(x.numpy(), ref, MOBILE)
    stats_only = Reference(ref.mu, ref.sigma, toy.name, "toy stats", n=20)
    res = evaluate_samples(x.numpy(), stats_only, MOBILE, backbone=toy)
    assert res["fid"] == a["fid"] and res["precision"] is None and "statistics only" in res["pr_note"]
    res = evaluate_samples(x.numpy(), ref, EvalConfig(pr_max=0, is_splits=3), backbone=toy)
    assert res["recall"] is None and "pr_max = 0" in res["pr_note"] and res["inception_score_splits"] == 3


def test_dataset_reference_is_cached_and_matches_its_own_images(tmp_path, mobilenet) -> None:
    from manifold_lab.data import build_dataset

    calls = []
    handle = mobilenet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        ref = reference_stats("fashion-mnist", mobilenet, split="test", image_size=32, max_items=10,
                              cache_dir=tmp_path, batch_size=5)
        assert sum(calls) == 10 and ref.n == 10 and ref.features.shape == (10, 1280)
        again = reference_stats("fashion-mnist", mobilenet, split="test", image_size=32, max_items=10,
                                cache_dir=tmp_path, batch_size=5)
        assert sum(calls) == 10  # second run: from the feature cache
        np.testing.assert_array_equal(again.sigma, ref.sigma)
    finally:
        handle.remove()
    ds = build_dataset("fashion-mnist", split="test", image_size=32)
    same = torch.stack([ds[int(i)][0] for i in subset_indices(len(ds), 10, 0)])
    seen = []
    res = evaluate_samples(images_to_uint8(same), "fashion-mnist", MOBILE, split="test", max_items=10,
                           cache_dir=tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert res["fid"] == pytest.approx(0.0, abs=1e-3) and res["precision"] == res["recall"] == 1.0
    assert seen[0] == (8, 11) and seen[-1] == (1, 1)  # one bar: 10 samples (+1 metrics), cached reference, done
    assert all(d < t for d, t in seen[:-1]) and [d for d, _ in seen[:-1]] == sorted(d for d, _ in seen[:-1])
    assert "fashion-mnist (test, 10 of 10000 images at 32px)" in res["reference"]


def test_stats_file_round_trip_and_backbone_refusal(tmp_path, mobilenet) -> None:
    write_samples_npz(tmp_path / "r.npz", _images(10, seed=1))
    ref = reference_stats(tmp_path / "r.npz", mobilenet, cache_dir=tmp_path)
    save_reference(tmp_path / "ref.safetensors", ref)
    loaded = load_reference(tmp_path / "ref.safetensors", mobilenet)
    np.testing.assert_array_equal(loaded.sigma, ref.sigma)
    assert loaded.n == 10 and torch.equal(loaded.features, ref.features) and loaded.backbone == mobilenet.name
    samples = _images(10, seed=2)
    auto = evaluate_samples(samples, str(tmp_path / "ref.safetensors"), EvalConfig(backbone="auto", device="cpu"))
    assert auto["backbone"] == mobilenet.name  # auto follows the stats file
    assert auto["fid"] > 1.0 and auto["samples"].startswith("uint8 array") and auto["recall"] is not None
    with pytest.raises(ManifoldLabError, match="was made with FID backbone mobilenet_v2-imagenet@128, not inception"):
        load_reference(tmp_path / "ref.safetensors", "inception")
    from manifold_lab.encoders.fid_backbones import build_fid_backbone

    with pytest.raises(ManifoldLabError, match="uses mobilenet_v2-imagenet@96") as err:
        load_reference(tmp_path / "ref.safetensors", build_fid_backbone("mobilenet_v2", input_size=96))
    assert "\n" not in str(err.value)
    with pytest.raises(ManifoldLabError, match="not inception"):
        evaluate_samples(samples, str(tmp_path / "ref.safetensors"), EvalConfig(backbone="inception", device="cpu"))
    save_reference(tmp_path / "stats_only.safetensors", ref, include_features=False)
    stats_only = load_reference(tmp_path / "stats_only.safetensors", "mobilenet_v2")
    assert stats_only.features is None and stats_only.n == 10
    np.testing.assert_array_equal(stats_only.mu, ref.mu)


def test_errors_are_one_line(tmp_path) -> None:
    write_samples_npz(tmp_path / "s.npz", _images(4))
    write_samples_npz(tmp_path / "empty.npz", np.zeros((0, 8, 8, 3), np.uint8))
    nan = np.full((2, 3, 8, 8), np.nan, np.float32)
    cases = [(tmp_path / "missing.npz", str(tmp_path / "s.npz"), "samples file not found"),
             (str(tmp_path / "empty.npz"), str(tmp_path / "s.npz"), "no samples"),
             (nan, str(tmp_path / "s.npz"), "NaN"),
             (str(tmp_path / "s.npz"), "no-such-dataset", "unknown reference"),
             (str(tmp_path / "s.npz"), str(tmp_path / "nope.safetensors"), "not found")]
    for samples, ref, msg in cases:
        with pytest.raises(ManifoldLabError, match=msg) as err:
            evaluate_samples(samples, ref, MOBILE)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="backbone"):
        EvalConfig(backbone="clip")
    with pytest.raises(ConfigError, match="pr_max"):
        EvalConfig(pr_max=2)
    assert EvalConfig(pr_max=0).pr_max == 0


# ---- torchrun: sharded features, metrics on rank 0 --------------------------------------------------


def _worker(rank: int, world: int, init_file: str, out_dir: str, samples: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = evaluate_samples(samples, samples, MOBILE, cache_dir=os.path.join(out_dir, "cache"),
                               backbone=ToyBackbone())
        if rank == 0:  # a caller that evaluates on rank 0 alone (shard=False) must not wait for the others
            alone = evaluate_samples(samples, samples, MOBILE, backbone=ToyBackbone(), shard=False)
            res["alone_fid"], res["alone_processes"] = alone["fid"], alone["processes"]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(res, fh)
    except BaseException:
        distributed.shutdown(wait=False)
        raise
    distributed.shutdown()


def test_two_processes_match_one(tmp_path) -> None:
    write_samples_npz(tmp_path / "s.npz", _images(7, seed=3))
    one = evaluate_samples(str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), MOBILE, cache_dir=tmp_path / "c1",
                           backbone=ToyBackbone())
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path / "s.npz")), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r1 == {"rank": 1, "n_samples": 7, "note": "metrics are computed on rank 0"}
    assert r0["processes"] == 2 and r0["n_samples"] == 7
    for key in ("fid", "precision", "recall", "inception_score"):
        assert r0[key] == pytest.approx(one[key], rel=1e-6, abs=1e-6)
    assert r0["fid"] == pytest.approx(0.0, abs=1e-6) and r0["precision"] == r0["recall"] == 1.0
    assert r0["alone_fid"] == pytest.approx(one["fid"], abs=1e-6) and r0["alone_processes"] == 1
