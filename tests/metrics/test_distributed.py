"""Accumulators under torch.distributed: two gloo processes fed halves == one process fed everything."""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from manifold_lab import distributed
from manifold_lab.metrics import ChannelStats, FeatureStats, LPCAccumulator, ReconAccumulator, SSCAccumulator

N = 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Batched eigh under 2 intra-op threads crawls when the shared CPU is busy; 1 thread is steady."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _data():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 4, 4, 4, generator=g, dtype=torch.float64)
    seg = torch.zeros(N, 4, 4, dtype=torch.long)
    seg[:, :, 2:] = 1
    seg[::2, 2:, :] = 2  # even images: 3 segments
    z = z + 3 * torch.nn.functional.one_hot(seg, 4).permute(0, 3, 1, 2)
    x = torch.rand(N, 3, 12, 12, generator=g, dtype=torch.float64) * 2 - 1
    rec = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    feats = torch.randn(N, 5, generator=g, dtype=torch.float64)
    return z, seg, x, rec, feats


def _decode(z):  # linear, norm-preserving up to a factor 2: LPC does not depend on the direction
    return 2 * z


def _l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


def _run(z, seg, x, rec, feats) -> dict:
    ssc, stats, fid, recon, lpc = SSCAccumulator(seed=1), ChannelStats(4), FeatureStats(5), ReconAccumulator(), \
        LPCAccumulator(seed=0)
    ssc.update(z, seg)
    stats.update(z)
    fid.update(feats)
    recon.update(x, rec, _l2(x, rec))
    lpc.update(z, _decode, _l2)
    return {"ssc": ssc.compute(), "stats": stats.compute(), "fid_mean": fid.mean().tolist(),
            "fid_cov": fid.cov().tolist(), "recon": recon.compute(), "lpc": lpc.compute()["per_rho"]}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z, seg, x, rec, feats = _data()
        sl = slice(rank, N, world)  # strided shards of unequal content
        res = _run(z[sl], seg[sl], x[sl], rec[sl], feats[sl] if rank == 0 else feats[sl][:1])
        res["lpc"] = {str(k): v for k, v in res["lpc"].items()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(res, fh)
    except BaseException:
        distributed.shutdown(wait=False)
        raise
    distributed.shutdown()  # a bare destroy_process_group() aborted at exit about once in ten runs


def test_two_gloo_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    z, seg, x, rec, feats = _data()
    keep = torch.tensor([i for i in range(N) if i % 2 == 0] + [1])  # rank 1 gave only its first feature row
    ref = _run(z, seg, x, rec, feats[keep])
    for r in (r0, r1):  # every rank gets the reduced result
        assert r["ssc"]["mean"] == pytest.approx(ref["ssc"]["mean"], abs=1e-12)
        assert r["ssc"]["n_images"] == ref["ssc"]["n_images"] == N
        for key in ("mean", "std", "min", "max", "dead_channels"):
            np.testing.assert_allclose(r["stats"][key], ref["stats"][key], rtol=1e-12, atol=1e-12)
        assert r["stats"]["n_images"] == N
        np.testing.assert_allclose(r["fid_mean"], ref["fid_mean"], rtol=1e-12)
        np.testing.assert_allclose(r["fid_cov"], ref["fid_cov"], rtol=1e-10, atol=1e-12)
        for key in ("psnr", "ssim", "perceptual", "n"):
            assert r["recon"][key] == pytest.approx(ref["recon"][key], rel=1e-12)
        for rho, v in ref["lpc"].items():
            assert r["lpc"][str(rho)] == pytest.approx(v, rel=1e-9)
