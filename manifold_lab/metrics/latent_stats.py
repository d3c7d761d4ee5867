"""Per-channel statistics of latents (B, C, h, w): mean, std, min, max, near-dead channels.

Counts, means and centred sums of squares are merged batch by batch and across processes with
Chan et al.'s parallel update, which stays exact in float64 even when a channel's mean is large
compared with its spread (a plain sum of squares would cancel).

A channel is "near-dead" when its std is below ``dead_threshold`` times the median channel std:
relative to the other channels, because latent scales differ by orders of magnitude between
tokenizers, and a channel that barely moves carries almost nothing a diffusion model can use.
"""

from __future__ import annotations

from typing import Any

import torch

from manifold_lab.distributed import all_gather_rows, is_distributed
from manifold_lab.metrics._inputs import MetricInputError, as_tensor, check_ndim


def _merge(n_a: torch.Tensor, mean_a: torch.Tensor, m2_a: torch.Tensor,
           n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Chan's pairwise merge of (count, mean, centred sum of squares) per channel."""
    n = n_a + n_b
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / safe
    m2 = m2_a + m2_b + delta ** 2 * n_a * n_b / safe
    return n, mean, m2


class ChannelStats:
    """Streaming per-channel statistics over (B, C, h, w) latent batches (process-reduced)."""

    def __init__(self, channels: int, dead_threshold: float = 1e-2) -> None:
        if int(channels) < 1:
            raise MetricInputError(f"ChannelStats: channels must be >= 1, got {channels}")
        self.channels, self.dead_threshold = int(channels), float(dead_threshold)
        c = self.channels
        self._n = torch.zeros(c, dtype=torch.float64)
        self._mean = torch.zeros(c, dtype=torch.float64)
        self._m2 = torch.zeros(c, dtype=torch.float64)
        self._min = torch.full((c,), float("inf"), dtype=torch.float64)
        self._max = torch.full((c,), float("-inf"), dtype=torch.float64)
        self._images = 0
        self._device: torch.device | None = None

    @torch.no_grad()
    def update(self, latents: Any) -> None:
        z = as_tensor(latents, "latent_stats: latents")
        check_ndim(z, 4, "latent_stats: latents", f"(B,{self.channels},h,w)")
        if z.shape[1] != self.channels:
            raise MetricInputError(f"latent_stats: latents have {z.shape[1]} channels, expected {self.channels}")
        if not z.is_floating_point():
            raise MetricInputError(f"latent_stats: latents must be floating point, got {z.dtype}")
        bad = int((~torch.isfinite(z)).sum().item())
        if bad:
            raise MetricInputError(f"latent_stats: latents contain {bad} NaN/inf values; the tokenizer or "
                                   "latents file is broken")
        if z.shape[0] == 0:
            return
        x = z.transpose(0, 1).reshape(self.channels, -1).to(torch.float64)  # (C, B*h*w)
        n_b = torch.full((self.channels,), float(x.shape[1]), dtype=torch.float64)
        mean_b = x.mean(dim=1)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(dim=1)
        self._n, self._mean, self._m2 = _merge(self._n, self._mean, self._m2, n_b, mean_b.cpu(), m2_b.cpu())
        self._min = torch.minimum(self._min, x.amin(dim=1).cpu())
        self._max = torch.maximum(self._max, x.amax(dim=1).cpu())
        self._images += z.shape[0]
        self._device = z.device

    def _gathered(self) -> tuple[torch.Tensor, ...]:
        """Every process's state as rows (P, C), merged here (Chan's update in rank order)."""
        row = torch.stack([self._n, self._mean, self._m2, self._min, self._max,
                           torch.full_like(self._n, float(self._images))])[None]  # (1, 6, C)
        if is_distributed():
            import torch.distributed as dist

            dev = self._device or (torch.device("cuda", torch.cuda.current_device())
                                   if dist.get_backend() == "nccl" else torch.device("cpu"))
            rows = all_gather_rows(row.to(dev)).cpu()
        else:
            rows = row
        n, mean, m2 = rows[0, 0], rows[0, 1], rows[0, 2]
        for r in rows[1:]:
            n, mean, m2 = _merge(n, mean, m2, r[0], r[1], r[2])
        return n, mean, m2, rows[:, 3].amin(dim=0), rows[:, 4].amax(dim=0), rows[:, 5, 0].sum()

    def compute(self) -> dict[str, Any]:
        """Lists per channel, global mean/std over all values, near-dead channels; population stds."""
        n, mean, m2, mn, mx, images = self._gathered()
        if float(n[0]) == 0:
            raise MetricInputError("latent_stats: no latents were given to the accumulator; call update() first")
        std = (m2 / n).sqrt()
        # global: merge the channels as if they were one population
        g_n, g_mean, g_m2 = n[:1], mean[:1], m2[:1]
        for c in range(1, self.channels):
            g_n, g_mean, g_m2 = _merge(g_n, g_mean, g_m2, n[c:c + 1], mean[c:c + 1], m2[c:c + 1])
        median_std = float(std.median())
        dead = std < self.dead_threshold * median_std if median_std > 0 else std <= 0
        return {
            "mean": mean.tolist(),
            "std": std.tolist(),
            "min": mn.tolist(),
            "max": mx.tolist(),
            "global_mean": float(g_mean[0]),
            "global_std": float((g_m2[0] / g_n[0]).sqrt()),
            "median_channel_std": median_std,
            "dead_channels": torch.nonzero(dead).squeeze(1).tolist(),
            "dead_fraction": float(dead.double().mean()),
            "dead_threshold": self.dead_threshold,
            "dead_rule": "std < dead_threshold * median channel std",
            "channels": self.channels,
            "n_images": int(images),
            "values_per_channel": int(n[0]),
        }
