"""Device choice and mixed precision, written once so no trainer grows CUDA-only code paths."""

from __future__ import annotations

import contextlib

import torch

from manifold_lab.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> the current CUDA device if there is one, else CPU; other names are checked.

    Under ``torchrun``, :func:`manifold_lab.distributed.init_from_env` has already selected the
    process's GPU, so ``"auto"`` and ``"cuda"`` both resolve to that GPU (not always ``cuda:0``).
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=cpu or auto")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist (this machine has "
                              f"{torch.cuda.device_count()} GPUs); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        device = torch.device("cuda", index)
    return device


def autocast_context(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device``'s type when ``precision == "bf16"``, else a no-op.

    bf16 keeps fp32's exponent range, so no loss scaling is needed; parameters and optimizer state stay
    fp32 (autocast only changes the dtype of the ops it covers).
    """
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
