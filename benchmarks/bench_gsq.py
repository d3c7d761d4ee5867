"""Chunked GSQ vs scikit-learn's brute-force cosine nearest neighbours, on the same centred features.

Data: --n pooled features of --channels dims drawn around --classes Gaussian class centres
(overlapping, so GSQ is neither 0 nor 1), fixed seed. Both methods answer "leave-one-out 1-NN by
cosine after centring, fraction with the same label":

  * ours:    manifold_lab.metrics.gsq(features, labels, chunk_size=...) (torch, float64, chunked
             top-1 search; memory O(chunk * N));
  * sklearn: NearestNeighbors(n_neighbors=2, metric="cosine", algorithm="brute") on the centred
             features; the neighbour that is not the query itself.

Each method runs in its own subprocess (same data regenerated from the seed). Peak memory is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the method minus the same reading taken after
imports and data generation (Linux reports KiB): the extra resident memory the method needed at its
peak. Wall time covers only the method call. Threads: --threads caps torch and the BLAS/OpenMP pools
of both (default 1).

    python benchmarks/bench_gsq.py [--n 50000] [--channels 32] [--classes 100] [--chunk-size 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def make_data(n: int, channels: int, classes: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, channels))
    labels = rng.integers(0, classes, size=n)
    feats = centres[labels] + 1.2 * rng.normal(size=(n, channels)) + 3.0  # offset: centring matters
    return feats, labels


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    feats, labels = make_data(args.n, args.channels, args.classes, args.seed)
    if args.worker == "ours":
        from manifold_lab.metrics import gsq

        def run() -> float:
            return gsq(feats, labels, chunk_size=args.chunk_size)
    else:
        from sklearn.neighbors import NearestNeighbors

        def run() -> float:
            fc = feats - feats.mean(axis=0)
            _, idx = NearestNeighbors(n_neighbors=2, metric="cosine", algorithm="brute").fit(fc).kneighbors(fc)
            nn = np.where(idx[:, 0] == np.arange(len(fc)), idx[:, 1], idx[:, 0])
            return float((labels[nn] == labels).mean())

    with threadpool_limits(limits=args.threads):
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        acc = run()
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"acc": acc, "wall": wall, "peak_mib": max(peak - base, 0) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", choices=["ours", "sklearn"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    common = ["--n", str(args.n), "--channels", str(args.channels), "--classes", str(args.classes),
              "--chunk-size", str(args.chunk_size), "--seed", str(args.seed), "--threads", str(args.threads)]
    res = {}
    for name in ("ours", "sklearn"):
        out = subprocess.run([sys.executable, __file__, "--worker", name, *common], check=True,
                             capture_output=True, text=True)
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"GSQ benchmark: N={args.n}, C={args.channels}, {args.classes} classes, chunk_size={args.chunk_size}, "
          f"threads={args.threads}")
    print(f"{'method':>31} | {'GSQ':>8} | {'wall s':>8} | {'peak extra MiB':>14}")
    labels = {"ours": f"manifold_lab gsq (chunk {args.chunk_size})", "sklearn": "sklearn NearestNeighbors brute"}
    for name in ("ours", "sklearn"):
        r = res[name]
        print(f"{labels[name]:>31} | {r['acc']:>8.5f} | {r['wall']:>8.2f} | {r['peak_mib']:>14.1f}")
    same = res["ours"]["acc"] == res["sklearn"]["acc"]
    print(f"accuracies identical: {same}; speed-up {res['sklearn']['wall'] / res['ours']['wall']:.2f}x; "
          f"peak-memory ratio (sklearn / ours) {res['sklearn']['peak_mib'] / max(res['ours']['peak_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
