"""LightningDiT training and sampling throughput against this machine's matmul peak.

For each size (default: T on an 8x8x8 latent, B on an 8x8x8 latent, both patch 1 = 64 tokens) it
measures, in one process and side by side:

  * training-step throughput (images/s) of one step = forward + backward + AdamW step on a flow-matching
    loss, with fused attention (``F.scaled_dot_product_attention``), then the achieved FLOP/s
    ``3 * flops_per_sample * images/s`` (forward + ~2x for backward; optimizer and elementwise work are
    not counted, so this is a lower bound of the work done) and its fraction of the matmul peak;
  * the same step with explicit softmax attention (same weights): fused / explicit speed ratio;
  * the same step under ``torch.compile`` (default inductor backend), compile time reported apart;
    skipped with the reason printed when compilation fails here;
  * eval-mode forward throughput (samples per second per network evaluation, no grad): what one
    sampler step costs (a CFG step evaluates 2x the batch).

The matmul peak is the best of several large (fp32, or bf16 with ``--amp bf16``) ``n x n`` matmuls
(``2 n^3`` FLOPs each) with the same thread count, measured again in every timing round; fractions use
the median of those rounds, so a busy machine lowers peak and model alike. Variants are timed in
interleaved rounds (A, B, C, A, B, C, ...) and each reports its median round, so background load hits
them alike; the load average is printed. Threads default to 1 (``--threads``): on a shared CPU,
multi-threaded kernels suffer from oversubscription far more than one large matmul (each of the many
small parallel regions waits for its slowest, descheduled thread; we saw 10x slower eager steps at
2 threads on 2 busy cores), so only single-thread numbers are comparable between runs there. Runs on CUDA when available (``--device``), with ``--amp bf16``
for autocast.

    python benchmarks/bench_dit_train.py [--sizes T,B] [--batch 64,8] [--latent 8x8x8] [--rounds 3]
        [--steps 5] [--threads 1] [--no-compile] [--device auto] [--amp none]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time

import torch
import torch.nn.functional as F

from manifold_lab.diffusion.model import DiTConfig, LightningDiT

NUM_CLASSES = 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, repeats: int, dtype: torch.dtype) -> float:
    """Best GFLOP/s of an n x n @ n x n matmul in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


class Runner:
    """One model variant with its optimizer, a fixed batch and a timed step."""

    def __init__(self, model: torch.nn.Module, step_module: torch.nn.Module, batch: int, shape: tuple[int, int, int],
                 device: torch.device, amp: torch.dtype | None, train: bool) -> None:
        self.model, self.fn, self.device, self.amp, self.train = model, step_module, device, amp, train
        g = torch.Generator().manual_seed(0)
        self.x0 = torch.randn(batch, *shape, generator=g).to(device)
        self.eps = torch.randn(batch, *shape, generator=g).to(device)
        self.t = torch.rand(batch, generator=g).to(device)
        self.y = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=g).to(device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
        self.batch = batch

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def step(self) -> None:
        t = self.t
        xt = (1 - t)[:, None, None, None] * self.x0 + t[:, None, None, None] * self.eps
        if self.train:
            self.model.train()
            with self._autocast():
                loss = F.mse_loss(self.fn(xt, t, self.y).float(), self.eps - self.x0)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.model.eval()
            with torch.no_grad(), self._autocast():
                self.fn(xt, t, self.y)

    def time_steps(self, steps: int) -> float:
        """Samples per second over ``steps`` steps."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps * self.batch / (time.perf_counter() - t0)


def bench_size(size: str, batch: int, shape: tuple[int, int, int], args, device, amp, peak_dtype: torch.dtype) -> None:
    c, h, w = shape
    cfg = DiTConfig(size=size, patch_size=1)
    dims = cfg.dims()
    base = LightningDiT(cfg, c, (h, w), NUM_CLASSES).to(device)
    flops = base.flops_per_sample()
    print(f"\n== size {size}: depth {dims.depth}, hidden {dims.hidden_size}, heads {dims.num_heads}, "
          f"latent {c}x{h}x{w} (patch 1, {h * w} tokens), batch {batch}, {base.num_params() / 1e6:.1f}M params, "
          f"{flops / 1e9:.3f} GFLOP/sample forward")

    def variant(fused: bool) -> LightningDiT:
        m = LightningDiT(dataclasses.replace(cfg, fused_attention=fused), c, (h, w), NUM_CLASSES).to(device)
        m.load_state_dict(base.state_dict())
        return m

    fused, explicit = variant(True), variant(False)
    runners = {
        "train eager, fused attention": Runner(fused, fused, batch, shape, device, amp, True),
        "train eager, explicit attention": Runner(explicit, explicit, batch, shape, device, amp, True),
    }
    eval_model = variant(True)
    runners["eval forward (no grad), fused"] = Runner(eval_model, eval_model, 2 * batch, shape, device, amp, False)
    compile_note = "skipped (--no-compile)"
    if not args.no_compile:
        cm = variant(True)
        try:
            compiled = torch.compile(cm)
            r = Runner(cm, compiled, batch, shape, device, amp, True)
            t0 = time.perf_counter()
            r.step()  # compiles forward and backward
            sync(device)
            compile_note = f"compiled in {time.perf_counter() - t0:.1f} s"
            runners["train compiled, fused attention"] = r
        except Exception as exc:  # noqa: BLE001 - report and go on
            first = (str(exc).splitlines() or [""])[0][:160]
            compile_note = f"skipped: torch.compile failed here ({type(exc).__name__}: {first})"

    for r in runners.values():  # warm-up (allocator, oneDNN/cuBLAS heuristics)
        for _ in range(args.warmup):
            r.step()
    rounds: dict[str, list[float]] = {k: [] for k in runners}
    peaks: list[float] = []
    for _ in range(args.rounds):
        peaks.append(matmul_peak(device, args.peak_n, repeats=3, dtype=peak_dtype))
        for name, r in runners.items():
            rounds[name].append(r.time_steps(args.steps))
    speed = {k: statistics.median(v) for k, v in rounds.items()}
    peak = statistics.median(peaks)

    print(f"matmul peak measured in the same rounds: median {peak:.1f} GFLOP/s (rounds: "
          f"{', '.join(f'{p:.0f}' for p in peaks)}); 'spread' = (max - min) / median over rounds")
    print(f"{'variant':>34} | {'samples/s':>10} | {'ms/step':>8} | {'achieved GFLOP/s':>16} | {'of peak':>7} | "
          f"{'spread':>6}")
    for name, sps in speed.items():
        mult = 3 if name.startswith("train") else 1
        gflops = mult * flops * sps / 1e9
        bsz = runners[name].batch
        spread = (max(rounds[name]) - min(rounds[name])) / sps
        print(f"{name:>34} | {sps:>10.1f} | {1000 * bsz / sps:>8.1f} | {gflops:>16.1f} | {gflops / peak:>7.1%} | "
              f"{spread:>6.0%}")
    ratio = speed["train eager, fused attention"] / speed["train eager, explicit attention"]
    print(f"fused / explicit attention (train step speed): {ratio:.2f}x")
    if "train compiled, fused attention" in speed:
        cr = speed["train compiled, fused attention"] / speed["train eager, fused attention"]
        print(f"torch.compile / eager (train step speed): {cr:.2f}x ({compile_note})")
    else:
        print(f"torch.compile / eager: {compile_note}")
    ev = speed["eval forward (no grad), fused"]
    print(f"sampler cost: {ev:.1f} network evaluations/s per sample at batch {2 * batch}, i.e. a 50-step "
          f"CFG sampler (2 evaluations per step) makes ~{ev / 100:.2f} samples/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="T,B", help="comma-separated DiT sizes")
    ap.add_argument("--batch", default="64,8", help="training batch per size (eval uses 2x: a CFG batch)")
    ap.add_argument("--latent", default="8x8x8", help="CxHxW of the latent, one for all sizes or one per size "
                                                       "separated by commas (e.g. 8x8x8,4x16x16)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1, as the repo's other benchmarks: stable on a shared machine)")
    ap.add_argument("--peak-n", type=int, default=2048, help="matrix size of the fp32 matmul peak")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast dtype")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the peak and the model both in true fp32
    amp = torch.bfloat16 if args.amp == "bf16" else None
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    batches = [int(b) for b in args.batch.split(",")]
    latents = [tuple(int(v) for v in s.split("x")) for s in args.latent.split(",")]
    if len(batches) == 1:
        batches *= len(sizes)
    if len(latents) == 1:
        latents *= len(sizes)
    if len(batches) != len(sizes) or len(latents) != len(sizes) or any(len(s) != 3 for s in latents):
        ap.error("--batch and --latent need one value, or one per size; --latent entries are CxHxW")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} torch threads"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"LightningDiT benchmark on {name}; torch {torch.__version__}; autocast {args.amp}; "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at start")
    peak_dtype = amp or torch.float32
    peak = matmul_peak(device, args.peak_n, repeats=5, dtype=peak_dtype)
    dtype_name = str(peak_dtype).removeprefix("torch.")
    print(f"{dtype_name} matmul peak ({args.peak_n}^3, best of 5) at start: {peak:.1f} GFLOP/s")
    t0 = time.perf_counter()
    for size, batch, shape in zip(sizes, batches, latents):
        bench_size(size, batch, shape, args, device, amp, peak_dtype)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average at end {load[0]:.2f} / {load[1]:.2f} / "
          f"{load[2]:.2f}")


if __name__ == "__main__":
    main()
