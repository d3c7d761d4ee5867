"""Variance-preserving diffusion maths for Unified Latents (UL): log-SNR schedules, the prior's
unweighted ELBO, the decoder's sigmoid-weighted ELBO and a deterministic DDIM sampler.

Conventions (used by :mod:`manifold_lab.tokenizers.ul` and its tests):

* Time ``t in [0, 1]``; **t = 0 is the clean end, t = 1 the noise end.** The log signal-to-noise
  ratio ``lambda(t)`` decreases from ``lambda_max`` at t = 0 to ``lambda_min`` at t = 1.
* Variance preserving: ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``,
  ``z_t = alpha_t * x + sigma_t * eps``.
* Networks predict ``v = alpha * eps - sigma * x`` (stable at both ends); then
  ``x_hat = alpha * z_t - sigma * v_hat`` and ``eps_hat = sigma * z_t + alpha * v_hat``. The losses are
  written on ``x_hat`` (the x-prediction form); the parametrisation does not change their value.

Schedules (:class:`LogSNRSchedule`):

* ``cosine`` -- the truncated, optionally shifted cosine schedule of Hoogeboom et al. (simple
  diffusion / SiD2): ``lambda(t) = -2 log tan(a + t (b - a)) + shift`` with a, b chosen so that
  ``lambda(0) = lambda_max`` and ``lambda(1) = lambda_min`` exactly. Then
  ``dlambda/dt = -4 (b - a) / sin(2 (a + t (b - a)))``.
* ``linear`` -- linear in log-SNR: ``lambda(t) = lambda_max + t (lambda_min - lambda_max)``.

The continuous-time ELBO (Kingma et al. 2021, VDM) of a VP diffusion whose data point is ``x`` and
whose first latent sits at ``lambda_max`` is, per example, in nats::

    KL(q(z_1|x) || N(0, I)) + E_{t~U(0,1)} [ -dlambda/dt * exp(lambda) / 2 * ||x - x_hat(z_t, t)||^2 ]

and is independent of the schedule's shape between its endpoints (only the estimator's variance
changes). UL's prior uses exactly this (weight 1 in lambda); UL's decoder multiplies the integrand by
``sigmoid(bias - lambda)`` (Kingma & Gao 2023's sigmoid weighting, written on the eps-MSE:
``exp(lambda) ||x - x_hat||^2 = ||eps - eps_hat||^2``).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear")


class LogSNRSchedule:
    """lambda(t) on t in [0, 1] with ``lambda(0) = lambda_max`` and ``lambda(1) = lambda_min``."""

    def __init__(self, kind: str = "cosine", lambda_min: float = -10.0, lambda_max: float = 5.0,
                 shift: float = 0.0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        if not lambda_min < lambda_max:
            raise ValueError(f"lambda_min ({lambda_min}) must be below lambda_max ({lambda_max})")
        self.kind = kind
        self.lambda_min = float(lambda_min)
        self.lambda_max = float(lambda_max)
        self.shift = float(shift)
        # cosine: u(t) = a + t (b - a), lambda = -2 log tan(u) + shift
        self._a = math.atan(math.exp(-(self.lambda_max - self.shift) / 2))
        self._b = math.atan(math.exp(-(self.lambda_min - self.shift) / 2))

    def __repr__(self) -> str:
        return (f"LogSNRSchedule({self.kind!r}, lambda_min={self.lambda_min}, lambda_max={self.lambda_max}, "
                f"shift={self.shift})")

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        """log-SNR lambda(t) (same shape and dtype as ``t``; computed in float64 when given float64)."""
        if self.kind == "linear":
            return self.lambda_max + t * (self.lambda_min - self.lambda_max)
        u = self._a + t * (self._b - self._a)
        return -2.0 * torch.log(torch.tan(u)) + self.shift

    def dlam_dt(self, t: torch.Tensor) -> torch.Tensor:
        """d lambda / d t in closed form (negative: lambda decreases with t)."""
        if self.kind == "linear":
            return torch.full_like(t, self.lambda_min - self.lambda_max)
        u = self._a + t * (self._b - self._a)
        return -4.0 * (self._b - self._a) / torch.sin(2.0 * u)


def alpha_sigma(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance-preserving (alpha, sigma) for log-SNR ``lam``: alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam)."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def prior_elbo_weight(schedule: LogSNRSchedule, t: torch.Tensor) -> torch.Tensor:
    """Weight of ``||x - x_hat||^2`` in the UNWEIGHTED ELBO: ``-dlambda/dt * exp(lambda) / 2``."""
    return -schedule.dlam_dt(t) * torch.exp(schedule.lam(t)) / 2.0


def sigmoid_elbo_weight(schedule: LogSNRSchedule, t: torch.Tensor, bias: float) -> torch.Tensor:
    """Weight of ``||x - x_hat||^2`` in the sigmoid-weighted ELBO:
    ``-dlambda/dt / 2 * sigmoid(bias - lambda) * exp(lambda)``, i.e. the eps-MSE weight
    ``-dlambda/dt / 2 * sigmoid(bias - lambda)`` (Kingma & Gao 2023). ``exp(lambda) * sigmoid(bias - lambda)``
    is evaluated as ``exp(bias) * sigmoid(lambda - bias)``, which never overflows."""
    lam = schedule.lam(t)
    # exp(lam) * sigmoid(bias - lam) = exp(lam) / (1 + exp(lam - bias)) = exp(bias) * sigmoid(lam - bias)
    return -schedule.dlam_dt(t) / 2.0 * math.exp(bias) * torch.sigmoid(lam - bias)


def terminal_kl(schedule: LogSNRSchedule, x: torch.Tensor) -> torch.Tensor:
    """KL(q(z_1 | x) || N(0, I)) at t = 1, summed over all but the batch dimension -> [B] nats."""
    lam1 = torch.full((), schedule.lambda_min, dtype=torch.float64)
    a2, s2 = float(torch.sigmoid(lam1)), float(torch.sigmoid(-lam1))
    xf = x.float().flatten(1)
    return 0.5 * (a2 * xf.pow(2) + s2 - 1.0 - math.log(s2)).sum(1)


def low_discrepancy_times(batch: int, device: torch.device | str, generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``batch`` times in [0, 1): one uniform offset, then evenly spread (VDM's variance reduction)."""
    u0 = torch.rand(()) if generator is None else torch.rand((), generator=generator, device=generator.device)
    t = (u0.to(device, torch.float64) + torch.arange(batch, device=device, dtype=torch.float64) / batch) % 1.0
    return t.to(dtype)


def v_to_x(z_t: torch.Tensor, v_hat: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * z_t - sigma * v_hat


def v_to_eps(z_t: torch.Tensor, v_hat: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sigma * z_t + alpha * v_hat


def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) matching ``like``'s rank."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


__all__ = ["SCHEDULES", "LogSNRSchedule", "alpha_sigma", "prior_elbo_weight", "sigmoid_elbo_weight",
           "terminal_kl", "low_discrepancy_times", "v_to_x", "v_to_eps", "expand"]
