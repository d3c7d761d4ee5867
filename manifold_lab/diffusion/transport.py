"""Flow-matching transport, the training side: training times, the linear path and the velocity loss.

Everything follows the package's one time convention (:mod:`manifold_lab.diffusion`): ``t = 0`` is
data, ``t = 1`` is noise, ``x_t = (1 - t) x_0 + t eps`` and the network predicts ``v = eps - x_0``.

Design, and where it follows the reference code
-----------------------------------------------
* **Training times.** ``t = sigmoid(m + s n)`` with ``n ~ N(0, 1)`` (logit-normal, SD3 / LightningDiT's
  ``use_lognorm``) or ``t ~ U(0, 1)``, then the time shift ``s t / (1 + (s - 1) t)`` (RAE applies the
  shift after drawing, exactly like this). LightningDiT draws with numpy/scipy; we use torch so an
  explicit ``torch.Generator`` makes every draw reproducible.
* **Dimension-dependent shift.** RAE sets ``s = sqrt(C h w / 4096)`` (:func:`shift_dim`), e.g. 3.46 for
  a 768x16x16 latent. ``shift: "auto"`` uses that rule but never goes below 1 (:func:`resolve_shift`):
  the convention asks for ``s >= 1`` (RAE itself asserts it), and a latent smaller than the 4096-dim
  reference (e.g. 4x16x16) would otherwise get a shift that moves time towards the data end. That floor
  is our choice.
* **Loss.** Plain MSE on the velocity, mean over all dimensions (SiT / LightningDiT, ``WeightType.NONE``),
  plus LightningDiT's optional cosine term ``1 - cos(v_pred, v_target)`` weighted by
  ``cos_loss_weight``. LightningDiT takes the cosine over the channel axis at each position
  (``cosine_similarity(dim=1)``) and averages over positions; we take it **per sample over all
  dimensions** (the flattened latent), the package's choice, also used by ``train_dit``. The two agree
  for flat ``(B, D)`` latents.
* **Logs** split the MSE by quarter of ``t`` (``mse_t0`` = ``t`` in [0, 0.25) ... ``mse_t3`` = [0.75, 1]),
  so a training curve shows which noise levels learn. A quarter with no sample in the batch has no key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from manifold_lab.errors import ConfigError, ManifoldLabError

T_SAMPLINGS = ("logit_normal", "uniform")
SHIFT_BASE = 4096

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def check_shift(shift: Any, where: str = "shift") -> None:
    """Raise ConfigError unless ``shift`` is a finite number >= 1 or ``"auto"``."""
    if isinstance(shift, str):
        if shift != "auto":
            raise ConfigError(f"{where} must be a number >= 1 or 'auto', got {shift!r}")
        return
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift < 1:
        raise ConfigError(f"{where} must be a number >= 1 or 'auto', got {shift!r}")


@dataclass
class TransportConfig:
    """How training times are drawn and how the velocity loss is formed."""

    t_sampling: str = "logit_normal"  # "logit_normal" (t = sigmoid(m + s n)) | "uniform"
    logit_mean: float = 0.0  # m of the logit-normal
    logit_std: float = 1.0  # s of the logit-normal
    shift: float | str = 1.0  # a number >= 1, or "auto" = max(1, sqrt(C*h*w / shift_base)) (RAE)
    shift_base: int = SHIFT_BASE
    cos_loss_weight: float = 0.0  # weight of LightningDiT's 1 - cos(v_pred, v_target) term (0 = off)
    # Times are clamped into [t_eps, 1]. 0 by default: with velocity prediction on the linear path the
    # target eps - x_0 is finite at both ends, so no end needs avoiding (SiT/LightningDiT also use
    # train_eps = 0 for a velocity model on the linear path); a logit-normal t never reaches 0 or 1 anyway.
    t_eps: float = 0.0

    def __post_init__(self) -> None:
        if self.t_sampling not in T_SAMPLINGS:
            raise ConfigError(f"transport.t_sampling must be one of {', '.join(T_SAMPLINGS)}, got {self.t_sampling!r}")
        if not math.isfinite(self.logit_mean):
            raise ConfigError(f"transport.logit_mean must be a finite number, got {self.logit_mean}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ConfigError(f"transport.logit_std must be > 0, got {self.logit_std}")
        check_shift(self.shift, "transport.shift")
        if isinstance(self.shift, int) and not isinstance(self.shift, bool):
            self.shift = float(self.shift)
        if self.shift_base < 1:
            raise ConfigError(f"transport.shift_base must be >= 1, got {self.shift_base}")
        if not (math.isfinite(self.cos_loss_weight) and self.cos_loss_weight >= 0):
            raise ConfigError(f"transport.cos_loss_weight must be >= 0, got {self.cos_loss_weight}")
        if not 0 <= self.t_eps < 1:
            raise ConfigError(f"transport.t_eps must be in [0, 1), got {self.t_eps}")


# ---------------------------------------------------------------------------------------------- time shift
def time_shift(t: torch.Tensor | float, s: float) -> torch.Tensor | float:
    """``s t / (1 + (s - 1) t)``: maps [0, 1] onto itself, fixes 0 and 1, moves time towards noise for s > 1."""
    return s * t / (1 + (s - 1) * t)


def inverse_time_shift(t: torch.Tensor | float, s: float) -> torch.Tensor | float:
    """The inverse of :func:`time_shift`: ``t / (s - (s - 1) t)``."""
    return t / (s - (s - 1) * t)


def shift_dim(latent_shape: Sequence[int], base: int = SHIFT_BASE) -> float:
    """RAE's dimension-dependent shift ``sqrt(prod(latent_shape) / base)`` (raw, may be below 1)."""
    if not latent_shape or any(int(d) < 1 for d in latent_shape):
        raise ManifoldLabError(f"latent_shape must be a non-empty tuple of positive sizes (C, h, w), "
                               f"got {latent_shape}")
    return math.sqrt(math.prod(int(d) for d in latent_shape) / base)


def resolve_shift(cfg_shift: float | str, latent_shape: Sequence[int] | None, base: int = SHIFT_BASE) -> float:
    """The shift to use: a number as is (must be >= 1), or for ``"auto"`` ``max(1, shift_dim(latent_shape))``."""
    check_shift(cfg_shift, "shift")
    if cfg_shift == "auto":
        if latent_shape is None:
            raise ManifoldLabError("shift 'auto' needs the latent shape (C, h, w); pass latent_shape")
        return max(1.0, shift_dim(latent_shape, base))
    return float(cfg_shift)


# --------------------------------------------------------------------------------------------- time draws
def sample_t(batch: int, cfg: TransportConfig, latent_shape: Sequence[int] | None = None,
             generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """``batch`` training times, float32 ``(batch,)``: logit-normal or uniform, then shifted and clamped.

    Drawn on ``generator``'s device (CPU without one: ``batch`` numbers cost nothing), returned on ``device``.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if cfg.t_sampling == "logit_normal":
        n = torch.randn(batch, generator=generator, device=draw_device, dtype=torch.float64)
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * n)
    else:
        t = torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float64)
    t = time_shift(t, resolve_shift(cfg.shift, latent_shape, cfg.shift_base))
    t = t.clamp(cfg.t_eps, 1.0).float()
    return t.to(device) if device is not None else t


# ------------------------------------------------------------------------------------------- linear path
def _bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """``t`` as a scalar or reshaped ``(B, 1, ..., 1)`` to broadcast against ``like``."""
    if not torch.is_tensor(t):
        return float(t)
    if t.ndim == 0:
        return t.to(like.dtype)
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ManifoldLabError(f"t must be a float or a ({like.shape[0]},) tensor, got shape {tuple(t.shape)}")
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """``x_t = (1 - t) x_0 + t eps`` (``t`` a float or ``(B,)``)."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``v = d x_t / dt = eps - x_0``."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """``x_0 = x_t - t v`` (the data estimate; also an Euler step from ``t`` straight to 0)."""
    return x_t - _bcast(t, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """``eps = x_t + (1 - t) v``."""
    return x_t + (1 - _bcast(t, x_t)) * v


# ------------------------------------------------------------------------------------------------- loss
class FlowMatchingLoss:
    """``loss(model_fn, x0, y, generator=None) -> (scalar loss, logs)`` for latents of ``latent_shape``.

    Draw order (fixed, so a seeded generator reproduces a step): first ``t`` (:func:`sample_t`), then
    ``eps`` (``torch.randn`` of ``x0``'s shape). Without a generator, ``t`` comes from the global CPU RNG
    and ``eps`` from the global RNG of ``x0``'s device; with one, both come from it on its device (give
    one on ``x0``'s device: a CPU generator for a GPU batch means a host-to-device copy of the noise).
    ``model_fn(x_t, t, y)`` must return the velocity, shaped like ``x0``; the loss is computed in float32.
    Logs are detached 0-d tensors: ``mse``, ``cos`` (only when ``cos_loss_weight > 0``) and ``mse_t0`` ..
    ``mse_t3`` (per-sample MSE averaged over the samples whose ``t`` is in that quarter; absent when none).
    """

    def __init__(self, cfg: TransportConfig, latent_shape: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        self.latent_shape = tuple(int(d) for d in latent_shape) if latent_shape is not None else None
        self.shift = resolve_shift(cfg.shift, self.latent_shape, cfg.shift_base)  # fail early on bad input

    def __call__(self, model_fn: ModelFn, x0: torch.Tensor, y: Any,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x0.ndim < 2:
            raise ManifoldLabError(f"x0 must be a batch (B, ...) of latents, got shape {tuple(x0.shape)}")
        if self.latent_shape is not None and tuple(x0.shape[1:]) != self.latent_shape:
            raise ManifoldLabError(f"x0 has latent shape {tuple(x0.shape[1:])} but the loss was built for "
                                   f"{self.latent_shape}; build FlowMatchingLoss with the cache's latent shape")
        batch = x0.shape[0]
        t_host = sample_t(batch, self.cfg, self.latent_shape, generator=generator)
        t = t_host.to(x0.device, non_blocking=True)
        noise_device = generator.device if generator is not None else x0.device
        eps = torch.randn(x0.shape, generator=generator, device=noise_device, dtype=x0.dtype).to(x0.device)

        return velocity_loss(model_fn, x0, eps, t, y, self.cfg.cos_loss_weight, t_host=t_host)


def velocity_loss(model_fn: ModelFn, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, y: Any,
                  cos_loss_weight: float = 0.0, t_host: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The flow-matching loss for given noise and times (the one place it is computed).

    MSE between ``model_fn(x_t, t, y)`` and ``eps - x0`` averaged over every dimension, plus
    ``cos_loss_weight`` times LightningDiT's cosine term: ``1 - cos`` between predicted and target
    velocity over the CHANNELS at each latent position (``dim=1``), averaged over positions and
    samples. Logs: ``mse``, ``cos`` (when on), ``mse_t0`` .. ``mse_t3`` (quarters of t present).
    ``t_host`` (a CPU copy of ``t``) avoids a device sync for the quarter logs.
    """
    x_t = interpolate(x0, eps, t)
    target = velocity_target(x0, eps).float()
    pred = model_fn(x_t, t, y)
    if pred.shape != x0.shape:
        raise ManifoldLabError(f"the model returned shape {tuple(pred.shape)} for latents {tuple(x0.shape)}; "
                               "it must predict the velocity, shaped like its input")
    pred = pred.float()
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    mse = per_sample.mean()
    loss = mse
    logs: dict[str, torch.Tensor] = {"mse": mse.detach()}
    if cos_loss_weight > 0:
        cos = (1 - F.cosine_similarity(pred, target, dim=1)).mean() if pred.ndim > 2 else \
            (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
        loss = loss + cos_loss_weight * cos
        logs["cos"] = cos.detach()
    with torch.no_grad():
        quarter_host = ((t_host if t_host is not None else t.detach().cpu()) * 4).long().clamp(0, 3)
        quarter = quarter_host.to(x0.device, non_blocking=True)
        for q in sorted(set(quarter_host.tolist())):
            logs[f"mse_t{q}"] = per_sample.detach()[quarter == q].mean()
    return loss, logs


__all__ = ["SHIFT_BASE", "T_SAMPLINGS", "FlowMatchingLoss", "TransportConfig", "check_shift", "eps_from_velocity",
           "interpolate", "inverse_time_shift", "velocity_loss", "resolve_shift", "sample_t", "shift_dim", "time_shift",
           "velocity_target", "x0_from_velocity"]
