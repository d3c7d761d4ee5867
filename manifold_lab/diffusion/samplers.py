"""Samplers for a velocity model: Euler, Heun and Euler-Maruyama from noise (t = 1) to data (t = 0).

All in the package's one time convention (:mod:`manifold_lab.diffusion`): ``x_t = (1 - t) x_0 + t eps``,
the model ``model(x, t_vec, y)`` returns ``v = eps - x_0``; from ``(x, v)`` the noise estimate is
``eps_hat = x + (1 - t) v`` and the score ``-eps_hat / t``.

Time grid
---------
``t_i = shift(1 - i / steps)``, ``i = 0 .. steps`` (``t_0 = 1``, ``t_steps = 0``), the same time shift
as training (``shift: "auto"`` = RAE's ``max(1, sqrt(C h w / 4096))``). With ``t_min > 0`` the first
``steps - 1`` steps cover ``[t_min, 1]`` (uniform before the shift, ending exactly at ``t_min``) and
the last step jumps from ``t_min`` to 0, like SiT's ``last_step_size``: ``steps`` counts every step,
the last one included. (References: RAE/SiT apply the shift to ``1 - linspace``; LightningDiT's
``timestep_shift`` is in its reversed time, where its 0.3 is our shift 1/0.3 = 3.33.)

Methods
-------
* ``euler``: ``x <- x + (t_next - t) v(x, t)``; ``steps`` evaluations.
* ``heun``: Euler predictor then the trapezoidal corrector with ``v(x_pred, t_next)`` on every step
  except the last, which stays an Euler step (EDM's Algorithm 1 does the same: no evaluation at the
  end time); ``2 steps - 1`` evaluations.
* ``euler_maruyama``: the reverse-time SDE with the same marginals as the linear path,
  ``dx = [v - w(t) score] dt + sqrt(2 w(t)) dW`` integrated from 1 to 0 (SiT's form: its ``diffusion``
  is our ``w = g^2 / 2``). Per step of size ``h = t - t_next``:
  ``x <- x - h (v + c(t) eps_hat) + sqrt(2 w(t) h) z`` with ``c(t) = w(t) / t`` (so ``w score = -c eps_hat``).
  ``sde_diffusion`` picks ``w`` (scaled by ``sde_norm``):

  - ``"sigma"`` (default): ``w = t`` (SiT's ``"sigma"`` / ``"linear"`` forms are both ``t`` on this
    path). Then ``c = 1``: the drift ``v + eps_hat`` is finite at ``t = 1`` and as ``t -> 0``, and the
    noise vanishes at the data end. Chosen because it is well-defined on the whole grid.
  - ``"increasing-decreasing"``: ``w = sin(pi t)^2``, zero at both ends, ``c`` -> 0 at both ends.
  - ``"none"``: ``w = 0``, the ODE (Euler), for checks.

  SiT's default ``"SBDM"`` is ``w = t / (1 - t)`` here, infinite at ``t = 1`` (SiT starts at ``1 - eps``
  to dodge it), and ``"constant"`` makes ``c = 1 / t`` blow up at the data end; neither is offered.
  The last step is deterministic (SiT): ``last_step="mean"`` is the SDE step without its noise (SiT's
  ``"Mean"``); ``"euler"`` is the ODE step, which lands on ``x_0 = x - t v``, the data estimate (SiT's
  ``"Tweedie"`` is the same thing on this path).

Classifier-free guidance: ``v_u + w (v_c - v_u)`` on ALL channels (several reference samplers guide
only the first 3 channels, a bug for latents), only where ``t`` is inside ``cfg_interval`` (our
convention, e.g. LightningDiT's "t > 0.11" is our ``(0, 0.89)``), with one forward on ``[x, x]`` and
labels ``[y, null]``. ``cfg_scale = 1`` never runs the unconditional branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from manifold_lab.diffusion.transport import (SHIFT_BASE, check_shift, eps_from_velocity, inverse_time_shift,
                                              resolve_shift, time_shift)
from manifold_lab.errors import ConfigError, ManifoldLabError

METHODS = ("euler", "heun", "euler_maruyama")
SDE_DIFFUSIONS = ("sigma", "increasing-decreasing", "none")
LAST_STEPS = ("mean", "euler")

Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class SamplerConfig:
    """How to integrate from noise to data (see the module docstring)."""

    method: str = "euler"  # "euler" | "heun" | "euler_maruyama"
    steps: int = 50  # integration steps (the last one included)
    cfg_scale: float = 1.0  # guidance weight w; 1 = no guidance (no unconditional forward at all)
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guide only while lo <= t <= hi (t = 1 is noise)
    shift: float | str = 1.0  # time shift of the grid: a number >= 1 or "auto" (as TransportConfig)
    shift_base: int = SHIFT_BASE
    sde_diffusion: str = "sigma"  # euler_maruyama's w(t): "sigma" (w = t) | "increasing-decreasing" | "none"
    sde_norm: float = 1.0  # scale of w(t)
    last_step: str = "mean"  # euler_maruyama's deterministic last step: "mean" (SDE drift) | "euler" (ODE)
    # > 0: the first steps - 1 steps end at t_min and the last step jumps from t_min to 0 (SiT's
    # last_step_size); 0: the plain grid, whose last step starts at t_{steps-1}.
    t_min: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"sample.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"sample.steps must be an integer >= 1, got {self.steps!r}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ConfigError(f"sample.cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        try:
            lo, hi = (float(v) for v in self.cfg_interval)
        except (TypeError, ValueError):
            raise ConfigError(f"sample.cfg_interval must be two numbers [lo, hi], got {self.cfg_interval!r}") from None
        if not 0 <= lo <= hi <= 1:
            raise ConfigError(f"sample.cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval!r}")
        self.cfg_interval = (lo, hi)
        check_shift(self.shift, "sample.shift")
        if isinstance(self.shift, int) and not isinstance(self.shift, bool):
            self.shift = float(self.shift)
        if self.shift_base < 1:
            raise ConfigError(f"sample.shift_base must be >= 1, got {self.shift_base}")
        if self.sde_diffusion not in SDE_DIFFUSIONS:
            raise ConfigError(f"sample.sde_diffusion must be one of {', '.join(SDE_DIFFUSIONS)}, "
                              f"got {self.sde_diffusion!r}")
        if not (math.isfinite(self.sde_norm) and self.sde_norm >= 0):
            raise ConfigError(f"sample.sde_norm must be >= 0, got {self.sde_norm}")
        if self.last_step not in LAST_STEPS:
            raise ConfigError(f"sample.last_step must be one of {', '.join(LAST_STEPS)}, got {self.last_step!r}")
        if not 0 <= self.t_min < 1:
            raise ConfigError(f"sample.t_min must be in [0, 1), got {self.t_min}")
        if self.t_min > 0 and self.steps < 2:
            raise ConfigError(f"sample.t_min > 0 needs steps >= 2 (the last step goes from t_min to 0), "
                              f"got {self.steps}")


# ------------------------------------------------------------------------------------------------ grid
def time_grid(cfg: SamplerConfig, latent_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The ``steps + 1`` times, float64, from 1 down to 0 (``latent_shape`` only for ``shift: "auto"``)."""
    s = resolve_shift(cfg.shift, latent_shape, cfg.shift_base)
    if cfg.t_min > 0:
        u_min = float(inverse_time_shift(cfg.t_min, s))
        u = torch.linspace(1.0, u_min, cfg.steps, dtype=torch.float64)
        grid = torch.cat([time_shift(u, s), torch.zeros(1, dtype=torch.float64)])
        grid[cfg.steps - 1] = cfg.t_min  # exact, whatever the rounding of the shift round trip
    else:
        u = torch.linspace(1.0, 0.0, cfg.steps + 1, dtype=torch.float64)
        grid = time_shift(u, s)
    grid[0], grid[-1] = 1.0, 0.0
    return grid


def _guided_at(t: float, cfg: SamplerConfig) -> bool:
    lo, hi = cfg.cfg_interval
    return cfg.cfg_scale != 1 and lo <= t <= hi


def evaluation_times(cfg: SamplerConfig, latent_shape: Sequence[int] | None = None) -> list[float]:
    """The times at which :func:`sample` calls the model, in order (one entry per call)."""
    grid = time_grid(cfg, latent_shape).tolist()
    times = []
    for i in range(cfg.steps):
        times.append(grid[i])
        if cfg.method == "heun" and i < cfg.steps - 1:
            times.append(grid[i + 1])
    return times


def nfe(cfg: SamplerConfig, latent_shape: Sequence[int] | None = None) -> int:
    """Network evaluations per sample: one per model call, two where guidance doubles the batch."""
    return sum(2 if _guided_at(t, cfg) else 1 for t in evaluation_times(cfg, latent_shape))


# ------------------------------------------------------------------------------------------------ CFG
def _t_vec(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if torch.is_tensor(t):
        if t.ndim == 0:
            return t.to(device=x.device, dtype=dtype).expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ManifoldLabError(f"t must be a float or a ({x.shape[0]},) tensor, got shape {tuple(t.shape)}")
        return t.to(device=x.device, dtype=dtype)
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=dtype)


def guided_velocity(model: Model, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None,
                    cfg_scale: float, interval: tuple[float, float], null_label: int) -> torch.Tensor:
    """The (guided) velocity at ``(x, t)``, in ``x``'s dtype.

    Where ``cfg_scale != 1`` and ``t`` is in ``interval`` (per sample when ``t`` is a tensor): ONE forward
    on ``[x, x]`` with labels ``[y, null_label]`` and ``v_u + cfg_scale (v_c - v_u)`` on all channels;
    elsewhere the conditional velocity from one plain forward.
    """
    tv = _t_vec(t, x)
    lo, hi = interval
    if torch.is_tensor(t) and t.ndim == 1:
        inside = (tv >= lo) & (tv <= hi)
        any_inside, all_inside = bool(inside.any()), bool(inside.all())
    else:  # one time for the whole batch: decided on the host, no device sync
        any_inside = all_inside = lo <= float(t) <= hi
    if cfg_scale == 1 or not any_inside:
        return model(x, tv, y).to(x.dtype)
    if y is None:
        raise ManifoldLabError("classifier-free guidance (cfg_scale != 1) needs class labels y; pass y or cfg_scale=1")
    null = torch.full_like(y, int(null_label))
    out = model(torch.cat([x, x]), torch.cat([tv, tv]), torch.cat([y, null])).to(x.dtype)
    v_c, v_u = out.chunk(2)
    guided = v_u + cfg_scale * (v_c - v_u)
    if all_inside:
        return guided
    return torch.where(inside.view(-1, *([1] * (x.ndim - 1))), guided, v_c)


# --------------------------------------------------------------------------------------------- sampler
def _sde_coefficients(cfg: SamplerConfig, t: float) -> tuple[float, float]:
    """(w(t), c(t) = w(t) / t) for the chosen diffusion, with the limits at the ends."""
    if cfg.sde_diffusion == "sigma":
        return cfg.sde_norm * t, cfg.sde_norm
    if cfg.sde_diffusion == "increasing-decreasing":
        w = cfg.sde_norm * math.sin(math.pi * t) ** 2
        return w, (w / t if t > 0 else 0.0)
    return 0.0, 0.0


def sample(model: Model, noise: torch.Tensor, y: torch.Tensor | None, cfg: SamplerConfig, num_classes: int,
           latent_shape: Sequence[int] | None = None, generator: torch.Generator | None = None,
           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate from ``noise`` (t = 1) to t = 0 and return the samples (same shape and dtype as ``noise``).

    ``y`` are class labels ``(B,)`` (``num_classes`` is the null label used by guidance; ``y`` may be None
    only without guidance). ``latent_shape`` defaults to ``noise.shape[1:]`` (it only matters for
    ``shift: "auto"``). ``generator`` drives Euler-Maruyama's noise (drawn on its device, then moved);
    ``progress(i, steps)`` is called after step ``i`` = 1 .. steps. The model runs under ``torch.no_grad``.
    """
    if noise.ndim < 2:
        raise ManifoldLabError(f"noise must be a batch (B, ...) of latents, got shape {tuple(noise.shape)}")
    if y is not None and (y.ndim != 1 or y.shape[0] != noise.shape[0]):
        raise ManifoldLabError(f"y must be ({noise.shape[0]},) class labels, got shape {tuple(y.shape)}")
    shape = tuple(latent_shape) if latent_shape is not None else tuple(noise.shape[1:])
    grid = time_grid(cfg, shape).tolist()
    steps = cfg.steps

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model, x, t, y, cfg.cfg_scale, cfg.cfg_interval, num_classes)

    x = noise
    with torch.no_grad():
        for i in range(steps):
            t, t_next = grid[i], grid[i + 1]
            last = i == steps - 1
            v = velocity(x, t)
            if cfg.method == "euler":
                x = x + (t_next - t) * v
            elif cfg.method == "heun":
                x_pred = x + (t_next - t) * v
                if last:
                    x = x_pred
                else:
                    x = x + (t_next - t) * 0.5 * (v + velocity(x_pred, t_next))
            else:
                h = t - t_next
                w, c = _sde_coefficients(cfg, t)
                if last and cfg.last_step == "euler":
                    x = x - h * v
                else:
                    x_mean = x - h * (v + c * eps_from_velocity(x, v, t)) if c else x - h * v
                    if last or w == 0:
                        x = x_mean
                    else:
                        z = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                        device=generator.device if generator is not None else x.device)
                        x = x_mean + math.sqrt(2 * w * h) * z.to(x.device)
            if progress is not None:
                progress(i + 1, steps)
    return x


# ------------------------------------------------------------------------------------------------ labels
def balanced_labels(n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """``n`` class labels (LongTensor ``(n,)``), class-balanced, in an order fixed by ``seed``.

    Every class appears ``n // num_classes`` times; when ``n`` is not a multiple, the first
    ``n % num_classes`` classes (0, 1, ...) get one more. The shuffle depends only on ``(n, num_classes,
    seed)``, so sample index ``i`` gets the same label however the samples are split over processes.
    """
    if isinstance(n, bool) or isinstance(num_classes, bool) or int(num_classes) < 1 or int(n) < int(num_classes):
        raise ManifoldLabError(f"balanced_labels needs n >= num_classes >= 1 (every class at least once), "
                               f"got n={n}, num_classes={num_classes}")
    n, num_classes = int(n), int(num_classes)
    labels = torch.arange(n, dtype=torch.long) % num_classes
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return labels[order]


__all__ = ["LAST_STEPS", "METHODS", "SDE_DIFFUSIONS", "SamplerConfig", "balanced_labels", "evaluation_times",
           "guided_velocity", "nfe", "sample", "time_grid"]
