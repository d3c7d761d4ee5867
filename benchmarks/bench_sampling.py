"""Sampling throughput of a LightningDiT per sampler and step count (what `sample` costs).

For the CPU budget's DiT (depth 4, width 128, 2 heads, patch 1 on an 8x8x8 latent: the embedded PAE's
latent) it times, side by side in one process and interleaved rounds (median reported):

  * Euler, Heun and Euler-Maruyama at several step counts, with CFG 1.5 (two network evaluations per
    step inside the guidance interval) and without (cfg 1.0);
  * samples per second, network evaluations (NFE) per sample, and NFE per second, so the cost per
    evaluation can be compared across samplers (it should be flat: the sampler adds little);
  * the ratio of each setting's samples/s to Euler-16 without CFG.

The weights are random (timing does not depend on them). Decoding and feature extraction are not
included: they are per sample, not per step.

    python benchmarks/bench_sampling.py [--batch 100] [--steps 4,8,16] [--rounds 2] [--threads N]   (~4 min)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from manifold_lab.diffusion.model import DiTConfig, LightningDiT
from manifold_lab.diffusion.samplers import SamplerConfig, nfe, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", default="4,8,16")
    ap.add_argument("--methods", default="euler,heun,euler_maruyama")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1, as the other benchmarks: stable on a shared machine)")
    ap.add_argument("--latent", default="8x8x8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c, h, w = (int(v) for v in args.latent.split("x"))
    torch.manual_seed(0)
    model = LightningDiT(DiTConfig(size="T", depth=4, hidden_size=128, num_heads=2), c, (h, w), 10).eval()
    for p in model.parameters():  # non-zero outputs (adaLN-Zero starts at 0)
        torch.nn.init.normal_(p, std=0.02)
    noise = torch.randn(args.batch, c, h, w)
    y = torch.arange(args.batch) % 10
    settings = [(m, s, cfg) for m in args.methods.split(",") for s in map(int, args.steps.split(","))
                for cfg in (1.0, 1.5)]
    times: dict[tuple, list[float]] = {k: [] for k in settings}
    sample(model, noise[:8], y[:8], SamplerConfig(method="euler", steps=2), num_classes=10)  # warm-up
    for _ in range(args.rounds):
        for key in settings:
            method, steps, cfg_scale = key
            cfg = SamplerConfig(method=method, steps=steps, cfg_scale=cfg_scale)
            t0 = time.perf_counter()
            sample(model, noise, y, cfg, num_classes=10)
            times[key].append(time.perf_counter() - t0)
    base = args.batch / statistics.median(times[("euler", 16, 1.0)]) if ("euler", 16, 1.0) in times else None
    print(f"LightningDiT depth 4 width 128 ({model.num_params() / 1e6:.2f}M params), latent {c}x{h}x{w}, "
          f"batch {args.batch}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':<15}{'steps':>6}{'cfg':>6}{'NFE':>6}{'samples/s':>11}{'NFE/s':>10}{'vs euler-16':>13}")
    for key in settings:
        method, steps, cfg_scale = key
        evals = nfe(SamplerConfig(method=method, steps=steps, cfg_scale=cfg_scale))
        rate = args.batch / statistics.median(times[key])
        ratio = f"{rate / base:.2f}x" if base else "-"
        print(f"{method:<15}{steps:>6}{cfg_scale:>6.1f}{evals:>6}{rate:>11.1f}{rate * evals:>10.0f}{ratio:>13}")


if __name__ == "__main__":
    main()
