"""LPC, local perceptual continuity: how much does the decoded image change, perceptually, when
the latent moves a little in a random direction? (lower is better; specs/metrics.md).

For each image, z = E(x) flattened (d = C*h*w), u uniform on S^(d-1), eps = rho * ||z||:
    LPC_rho = E_{x,u} [ (P(D(z + eps u), D(z)) + P(D(z - eps u), D(z))) / 2 ]
    LPC     = sum_s w_s LPC_rho_s,  w_s = (1 / rho_s) / sum_r (1 / rho_r).

Directions come from a CPU ``torch.Generator`` seeded with ``seed`` (offset by the process rank
under DDP so ranks do not reuse directions), then moved to the latents' device: the same seed
gives the same directions on CPU and CUDA.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from manifold_lab.distributed import all_reduce_sum, is_distributed, rank
from manifold_lab.metrics._inputs import MetricInputError, as_tensor, check_finite, check_ndim

Decode = Callable[[torch.Tensor], torch.Tensor]
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Rank offset for the direction generator's seed (a large prime keeps rank streams apart).
_RANK_SEED_STRIDE = 1_000_003


def lpc_weights(rhos: Sequence[float]) -> list[float]:
    """w_s proportional to 1 / rho_s, summing to 1."""
    inv = [1.0 / float(r) for r in rhos]
    total = sum(inv)
    return [v / total for v in inv]


def _check_rhos(rhos: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(r) for r in rhos)
    if not out or any(not (math.isfinite(r) and r > 0) for r in out):
        raise MetricInputError(f"lpc: rhos must be a non-empty list of positive numbers, got {list(rhos)}")
    return out


def _per_sample(d: Any, b: int, what: str) -> torch.Tensor:
    t = as_tensor(d, what)
    if t.ndim > 1:
        t = t.reshape(t.shape[0], -1).mean(dim=1) if t.shape[0] == b else t
    if t.ndim != 1 or t.shape[0] != b:
        raise MetricInputError(f"{what} must return one value per sample, shape ({b},), got {tuple(t.shape)}")
    return t.to(torch.float64)


def _distance_name(distance: Distance) -> str:
    return str(getattr(distance, "name", None) or getattr(distance, "__name__", None) or type(distance).__name__)


def random_unit_directions(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Rows uniform on the unit sphere: shape (B, d) Gaussian draws divided by their norms (CPU, float64)."""
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    norms = g.norm(dim=1, keepdim=True)
    return g / torch.where(norms > 0, norms, torch.ones_like(norms))


class LPCAccumulator:
    """Streaming LPC over batches of already-encoded latents (one encode pass serves every metric).

    Keeps, per rho, the sum and sum of squares of the two-sided perceptual change over
    (image, direction) pairs; ``compute()`` sums them over processes.
    """

    def __init__(self, rhos: Sequence[float] = (0.1, 0.5, 1.0, 2.0), seed: int = 0, directions: int = 1) -> None:
        self.rhos = _check_rhos(rhos)
        if int(directions) < 1:
            raise MetricInputError(f"lpc: directions must be >= 1, got {directions}")
        self.seed, self.directions = int(seed), int(directions)
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed + _RANK_SEED_STRIDE * rank())
        self._sum = torch.zeros(len(self.rhos), dtype=torch.float64)
        self._sumsq = torch.zeros(len(self.rhos), dtype=torch.float64)
        self._n = 0
        self._device: torch.device | None = None
        self.distance_name: str | None = None

    @torch.no_grad()
    def update(self, z: Any, decode: Decode, distance: Distance) -> None:
        """Perturb each latent of the batch (B, ...) along ``directions`` random unit directions."""
        z = as_tensor(z, "lpc: latents")
        if z.ndim < 2:
            raise MetricInputError(f"lpc: latents must be batched (B, C, h, w), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise MetricInputError(f"lpc: latents must be floating point, got {z.dtype}")
        check_finite(z, "lpc: latents")
        b = z.shape[0]
        if b == 0:
            return
        flat = z.reshape(b, -1)
        znorm = flat.to(torch.float64).norm(dim=1, keepdim=True)  # (B, 1)
        base = decode(z)
        self.distance_name = _distance_name(distance)
        self._device = z.device
        sums = torch.zeros(len(self.rhos), dtype=torch.float64, device=z.device)
        sumsq = torch.zeros_like(sums)
        for _ in range(self.directions):
            u = random_unit_directions(tuple(flat.shape), self._gen).to(z.device)
            for s, rho in enumerate(self.rhos):
                step = (rho * znorm * u).to(z.dtype).reshape(z.shape)
                plus = _per_sample(distance(decode(z + step), base), b, "lpc: distance")
                minus = _per_sample(distance(decode(z - step), base), b, "lpc: distance")
                value = (plus + minus) / 2
                check_finite(value, "lpc: perceptual distances")
                sums[s] += value.sum()
                sumsq[s] += (value ** 2).sum()
        self._sum += sums.cpu()
        self._sumsq += sumsq.cpu()
        self._n += b

    def _reduced(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        state = torch.cat([self._sum, self._sumsq, torch.tensor([float(self._n)], dtype=torch.float64)])
        if is_distributed():
            dev = self._device
            if dev is None:
                import torch.distributed as dist

                dev = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                       else torch.device("cpu"))
            state = all_reduce_sum(state.to(dev)).cpu()
        s = len(self.rhos)
        return state[:s], state[s:2 * s], int(round(state[-1].item()))

    def compute(self) -> dict[str, Any]:
        """Weighted LPC, LPC per rho (and its std over image-direction pairs), weights, counts."""
        sums, sumsq, n = self._reduced()
        if n == 0:
            raise MetricInputError("lpc: no latents were given to the accumulator; call update() first")
        m = n * self.directions
        mean = sums / m
        std = (sumsq / m - mean ** 2).clamp_min(0).sqrt()
        weights = lpc_weights(self.rhos)
        return {
            "lpc": float(sum(w * float(v) for w, v in zip(weights, mean))),
            "per_rho": {rho: float(v) for rho, v in zip(self.rhos, mean)},
            "per_rho_std": {rho: float(v) for rho, v in zip(self.rhos, std)},
            "weights": dict(zip(self.rhos, weights)),
            "rhos": list(self.rhos),
            "n_images": n,
            "n_directions": self.directions,
            "seed": self.seed,
            "distance": self.distance_name,
        }


def _batches(images: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = as_tensor(images, "lpc: images")
        check_ndim(x, 4, "lpc: images", "(N,3,H,W)")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size]
    else:  # an iterable of image batches (e.g. a DataLoader yielding tensors or (images, labels))
        for item in images:
            x = item[0] if isinstance(item, (tuple, list)) else item
            x = as_tensor(x, "lpc: images")
            check_ndim(x, 4, "lpc: images", "(B,3,H,W)")
            yield x


@torch.no_grad()
def lpc(encode: Callable[[torch.Tensor], torch.Tensor], decode: Decode, images: Any, distance: Distance,
        rhos: Sequence[float] = (0.1, 0.5, 1.0, 2.0), seed: int = 0, batch_size: int = 64,
        directions: int = 1) -> dict[str, Any]:
    """LPC of a tokenizer on ``images`` (N,3,H,W in [-1,1], or an iterable of batches).

    ``distance(x, y) -> (B,)`` is the perceptual distance (LPIPS in the paper).
    """
    if int(batch_size) < 1:
        raise MetricInputError(f"lpc: batch_size must be >= 1, got {batch_size}")
    acc = LPCAccumulator(rhos=rhos, seed=seed, directions=directions)
    for x in _batches(images, int(batch_size)):
        check_finite(x, "lpc: images")
        acc.update(encode(x), decode, distance)
    out = acc.compute()
    out["batch_size"] = int(batch_size)
    return out


@torch.no_grad()
def path_lipschitz(z_a: Any, z_b: Any, decode: Decode, distance: Distance, steps: int = 8,
                   reduce: str = "mean") -> torch.Tensor:
    """Local Lipschitz estimate along straight latent paths, per pair (B,).

    Decodes z_t = z_a + t (z_b - z_a) at t = 0, 1/steps, ..., 1; for each neighbouring pair the
    ratio P(D(z_t), D(z_t')) / ||z_t' - z_t|| (the step length, constant along a path); then the
    mean (or max, ``reduce="max"``) over the ``steps`` segments. Pairs with z_a == z_b have no
    path and give NaN.
    """
    a = as_tensor(z_a, "path_lipschitz: z_a")
    b = as_tensor(z_b, "path_lipschitz: z_b", device=a.device)
    if a.ndim < 2 or a.shape != b.shape:
        raise MetricInputError(f"path_lipschitz: z_a and z_b must be batched latents of equal shape, "
                               f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if not a.is_floating_point():
        raise MetricInputError(f"path_lipschitz: latents must be floating point, got {a.dtype}")
    check_finite(a, "path_lipschitz: z_a")
    check_finite(b, "path_lipschitz: z_b")
    if int(steps) < 1:
        raise MetricInputError(f"path_lipschitz: steps must be >= 1, got {steps}")
    if reduce not in ("mean", "max"):
        raise MetricInputError(f"path_lipschitz: reduce must be 'mean' or 'max', got {reduce!r}")
    n = a.shape[0]
    delta = b - a
    step_len = delta.reshape(n, -1).to(torch.float64).norm(dim=1) / int(steps)
    ratios = []
    prev = decode(a)
    for i in range(1, int(steps) + 1):
        cur = decode(a + delta * (i / int(steps)))
        d = _per_sample(distance(cur, prev), n, "path_lipschitz: distance")
        ratios.append(d.to(step_len.device) / step_len)
        prev = cur
    r = torch.stack(ratios, dim=1)
    out = r.mean(dim=1) if reduce == "mean" else r.amax(dim=1)
    return torch.where(step_len > 0, out, torch.full_like(out, float("nan")))
