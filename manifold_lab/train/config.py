"""Typed settings of the training engine (``train:`` section of every training YAML).

Every field is validated when the dataclass is built (by hand or by :func:`manifold_lab.config.from_dict`),
so a bad value fails at start-up with one :class:`ConfigError` line instead of hours into a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from manifold_lab.errors import ConfigError

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "constant" (linear warm-up, then decay to min_lr_ratio*lr or stay)
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in SCHEDULES,
               f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """How long, how big and how safely to train; shared by every trainer in the package."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (really accumulates)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.999
    ckpt_every: int = 500
    log_every: int = 50
    seed: int = 0
    precision: str = "fp32"  # "fp32" | "bf16" (torch.autocast on the device type)
    device: str = "auto"  # "auto" -> cuda if available else cpu
    compile: bool = False  # torch.compile the training module
    num_workers: int = 0
    tensorboard: bool = True
    keep_last: int = 1  # checkpoints kept under run_dir/checkpoints (older ones are deleted)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        _check(self.steps >= 0, f"train.steps must be >= 0, got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _check(0 <= self.ema_decay <= 1, f"train.ema_decay must be in [0, 1], got {self.ema_decay}")
        _check(self.ckpt_every >= 1, f"train.ckpt_every must be >= 1, got {self.ckpt_every}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.precision in PRECISIONS,
               f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        _check(self.num_workers >= 0, f"train.num_workers must be >= 0, got {self.num_workers}")
        _check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
