"""Batched SSC vs scikit-learn's per-image spectral clustering, on the same affinities.

Synthetic images: random Voronoi layouts with 2-4 segments on an h x w latent grid; every segment
gets a random C-dim prototype and every token Gaussian noise. For each grid size we time

  * ours:    manifold_lab.metrics.ssc_per_image on the whole batch (affinities, batched
             Chebyshev-filtered subspace iteration for the k eigenvectors, batched k-means, NMI),
             on --device;
  * sklearn: per image, the same affinity exp((<z_i,z_j> - max) / sigma) with a zero diagonal,
             SpectralClustering(affinity="precomputed", assign_labels="kmeans", random_state=seed),
             then normalized_mutual_info_score(average_method="geometric"),

and print mean NMI of both, wall times and the speed ratio. Each method runs once untimed on a
few images first, so lazy library loading is not counted. Threads: --threads caps torch's
intra-op threads and the BLAS/OpenMP pools of numpy/scipy/scikit-learn for both methods
(default 1: on a shared machine multi-threaded BLAS calls are dominated by waiting).

    python benchmarks/bench_ssc.py [--images 256] [--grids 8 16] [--channels 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import normalized_mutual_info_score
from threadpoolctl import threadpool_limits

from manifold_lab.metrics import ssc_per_image


def make_data(n: int, grid: int, channels: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    segs = torch.zeros(n, grid, grid, dtype=torch.long)
    for i in range(n):
        while True:
            k = int(torch.randint(2, 5, (1,), generator=g))
            c = torch.rand(k, 2, generator=g) * grid
            lab = ((yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2).argmin(0)
            if lab.unique().numel() == k:
                break
        segs[i] = lab
    protos = torch.randn(n, 4, channels, generator=g)
    z = protos[torch.arange(n)[:, None, None], segs].permute(0, 3, 1, 2)
    return z + noise * torch.randn(z.shape, generator=g), segs


def sklearn_ssc(z: torch.Tensor, segs: torch.Tensor, sigma: float, seed: int) -> np.ndarray:
    out = []
    for i in range(z.shape[0]):
        t = z[i].reshape(z.shape[1], -1).T.double().numpy()
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-300)
        gram = t @ t.T
        np.fill_diagonal(gram, -np.inf)
        aff = np.exp((gram - gram.max()) / sigma)
        truth = segs[i].reshape(-1).numpy()
        k = len(np.unique(truth))
        lab = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="kmeans",
                                 random_state=seed).fit_predict(aff)
        out.append(normalized_mutual_info_score(truth, lab, average_method="geometric"))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--grids", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-init", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    print(f"SSC benchmark: {args.images} images, C={args.channels}, noise={args.noise}, sigma={args.sigma}, "
          f"n_init={args.n_init}, threads={args.threads}, device={dev}")
    print(f"{'grid':>6} {'N tok':>6} | {'NMI ours':>8} {'NMI sklearn':>11} | {'ours s':>8} {'sklearn s':>9} "
          f"{'speed-up':>8}")
    with threadpool_limits(limits=args.threads):
        for grid in args.grids:
            z, segs = make_data(args.images, grid, args.channels, args.noise, args.seed)
            zd, sd = z.to(dev), segs.to(dev)
            ssc_per_image(zd[:4], sd[:4], sigma=args.sigma, seed=args.seed, n_init=args.n_init)  # warm-up
            sklearn_ssc(z[:2], segs[:2], args.sigma, args.seed)
            sync()
            t0 = time.perf_counter()
            ours = ssc_per_image(zd, sd, sigma=args.sigma, seed=args.seed, n_init=args.n_init)
            sync()
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = sklearn_ssc(z, segs, args.sigma, args.seed)
            t_ref = time.perf_counter() - t0
            print(f"{grid:>3}x{grid:<2} {grid * grid:>6} | {ours.mean().item():>8.4f} {ref.mean():>11.4f} | "
                  f"{t_ours:>8.3f} {t_ref:>9.3f} {t_ref / t_ours:>7.1f}x")


if __name__ == "__main__":
    main()
