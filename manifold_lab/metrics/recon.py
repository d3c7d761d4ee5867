"""Reconstruction quality: PSNR, SSIM and a perceptual distance, per sample and streamed.

Images are float NCHW in [-1, 1] (house rule), so PSNR's data range is 2 and SSIM maps images to
[0, 1] first. SSIM is torchmetrics' Gaussian-window SSIM (11 x 11, sigma 1.5, k1 0.01, k2 0.03).
"""

from __future__ import annotations

from typing import Any

import torch
from manifold_lab.distributed import all_reduce_sum, is_distributed
from manifold_lab.metrics._inputs import MetricInputError, as_tensor, check_finite, check_ndim


def _pair(x: Any, y: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = as_tensor(x, f"{what}: x")
    b = as_tensor(y, f"{what}: y", device=a.device)
    check_ndim(a, 4, f"{what}: images", "(B,C,H,W)")
    if a.shape != b.shape:
        raise MetricInputError(f"{what}: images have shapes {tuple(a.shape)} and {tuple(b.shape)}; they must match")
    a, b = a.to(torch.float64), b.to(torch.float64)
    check_finite(a, f"{what}: x")
    check_finite(b, f"{what}: y")
    return a, b


def psnr(x: Any, y: Any, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB (B,) = 10 log10(data_range^2 / MSE); +inf for identical images."""
    a, b = _pair(x, y, "psnr")
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(float(data_range) ** 2 / mse)


def ssim(x: Any, y: Any) -> torch.Tensor:
    """Per-sample SSIM (B,) of images in [-1, 1] (mapped to [0, 1], data range 1)."""
    import warnings

    a, b = _pair(x, y, "ssim")
    if min(a.shape[-2:]) < 11:
        raise MetricInputError(f"ssim: images of {a.shape[-2]}x{a.shape[-1]} are smaller than the 11x11 SSIM window")
    # float32: torchmetrics' float64 Gaussian convolutions are ~40x slower on CPU, and SSIM needs no
    # more than single precision (agreement ~1e-6)
    a32, b32 = ((a + 1) / 2).float(), ((b + 1) / 2).float()
    # torchmetrics warns (on import and on first call) about an unrelated deprecated alias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from torchmetrics.functional import structural_similarity_index_measure  # slow import: only when used

        out = structural_similarity_index_measure(a32, b32, data_range=1.0, reduction="none")
    return out.reshape(a.shape[0]).to(torch.float64)


class ReconAccumulator:
    """Streams (x, x_rec[, perceptual]) batches; ``compute()`` reduces over processes.

    ``perceptual`` is either the per-sample distances (B,) already computed (LPIPS in the paper) or
    a callable ``distance(x, x_rec) -> (B,)``. Reconstructions are clamped to [-1, 1] first when
    ``clamp`` is true, as they are when shown as images. PSNR is averaged per sample (in dB).
    """

    def __init__(self, data_range: float = 2.0, clamp: bool = True, perceptual_name: str | None = None) -> None:
        self.data_range, self.clamp, self.perceptual_name = float(data_range), bool(clamp), perceptual_name
        # psnr_sum, psnr_sq, ssim_sum, ssim_sq, n, perc_sum, perc_sq, n_perc, n_inf_psnr
        self._state = torch.zeros(9, dtype=torch.float64)
        self._device: torch.device | None = None

    @torch.no_grad()
    def update(self, x: Any, x_rec: Any, perceptual: Any = None) -> None:
        x = as_tensor(x, "recon: x")
        x_rec = as_tensor(x_rec, "recon: x_rec", device=x.device)
        if self.clamp:
            x_rec = x_rec.clamp(-1, 1)
        p = psnr(x, x_rec, self.data_range)
        s = ssim(x, x_rec)
        finite = torch.isfinite(p)
        st = torch.zeros(9, dtype=torch.float64)
        st[0] = p[finite].sum().cpu()
        st[1] = (p[finite] ** 2).sum().cpu()
        st[2] = s.sum().cpu()
        st[3] = (s ** 2).sum().cpu()
        st[4] = p.shape[0]
        st[8] = (~finite).sum().cpu()
        if perceptual is not None:
            d = perceptual(x, x_rec) if callable(perceptual) else perceptual
            d = as_tensor(d, "recon: perceptual", dtype=torch.float64)
            d = d.reshape(d.shape[0], -1).mean(dim=1) if d.ndim > 1 else d
            if d.ndim != 1 or d.shape[0] != p.shape[0]:
                raise MetricInputError(f"recon: perceptual must hold one value per image ({p.shape[0]}), "
                                       f"got shape {tuple(d.shape)}")
            check_finite(d, "recon: perceptual distances")
            st[5] = d.sum().cpu()
            st[6] = (d ** 2).sum().cpu()
            st[7] = d.shape[0]
        self._state += st
        self._device = x.device

    def compute(self) -> dict[str, Any]:
        st = self._state
        if is_distributed():
            import torch.distributed as dist

            dev = self._device or (torch.device("cuda", torch.cuda.current_device())
                                   if dist.get_backend() == "nccl" else torch.device("cpu"))
            st = all_reduce_sum(st.to(dev)).cpu()
        n, n_perc, n_inf = int(st[4]), int(st[7]), int(st[8])
        if n == 0:
            raise MetricInputError("recon: no images were given to the accumulator; call update() first")

        def mean_std(total: torch.Tensor, sq: torch.Tensor, count: int) -> tuple[float, float]:
            m = float(total) / count
            return m, max(float(sq) / count - m * m, 0.0) ** 0.5

        n_fin = n - n_inf
        if n_fin:
            psnr_m, psnr_s = mean_std(st[0], st[1], n_fin)
            psnr_m = psnr_m if n_inf == 0 else float("inf")
        else:
            psnr_m, psnr_s = float("inf"), 0.0
        ssim_m, ssim_s = mean_std(st[2], st[3], n)
        perc_m, perc_s = mean_std(st[5], st[6], n_perc) if n_perc else (None, None)
        return {
            "psnr": psnr_m, "psnr_std": psnr_s, "n_exact": n_inf,
            "ssim": ssim_m, "ssim_std": ssim_s,
            "perceptual": perc_m, "perceptual_std": perc_s, "perceptual_name": self.perceptual_name,
            "n": n, "n_perceptual": n_perc, "data_range": self.data_range, "clamped": self.clamp,
        }
