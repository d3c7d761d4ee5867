"""What a run reports while it trains: a rich progress bar, TensorBoard, ``metrics.jsonl`` and image grids.

Only the main process (rank 0) reports; the others get a disabled logger. The progress bar (with ETA
and the latest running losses) is drawn only on a terminal; when stdout is a file or pipe (cluster
logs, pytest) the logger prints one plain line per log step instead, so nothing depends on a TTY.
``metrics.jsonl`` holds one JSON object per log step and is trimmed back to the resume step on a
restart, like TensorBoard's ``purge_step``, so a resumed run never shows the killed run's extra steps.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from manifold_lab.errors import ConfigError
from manifold_lab.io import write_text


class RunLogger:
    """Progress, scalars and images of one training run (no-op when ``enabled`` is False)."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, *, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self._writer = None
        self._progress = None
        self._task = None
        self._console = None
        self._last_time = time.perf_counter()
        self._last_step = start_step
        if not enabled:
            return
        self._trim_metrics(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true but the tensorboard package is not installed; "
                                  "pip install tensorboard or set train.tensorboard=false") from None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                         purge_step=start_step + 1 if start_step > 0 else None)
        if progress:
            from rich.console import Console

            self._console = Console()
            if self._console.is_terminal:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)

                self._progress = Progress(
                    TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                    console=self._console)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RunLogger":
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total_steps,
                                                 completed=self.start_step, losses="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ reporting
    def advance(self, step: int) -> None:
        """Move the progress bar to optimizer step ``step`` (cheap; called every step)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record scalars for ``step`` everywhere (TensorBoard ``train/<key>``, jsonl, bar / plain line)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if step > self._last_step:
            values = {**values, "steps_per_sec": (step - self._last_step) / max(now - self._last_time, 1e-9)}
        self._last_time, self._last_step = now, step
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"train/{key}", value, step)
            self._writer.flush()
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in values.items() if k != "steps_per_sec")
        if self._progress is not None and self._task is not None:
            short = [(k, v) for k, v in values.items() if k not in ("steps_per_sec", "epoch", "grad_norm")]
            self._progress.update(self._task, completed=step,
                                  losses="  ".join(f"{k}={_fmt(v)}" for k, v in short[:4]))
        elif self._console is not None:
            self._console.print(f"step {step}/{self.total_steps}  {text}", markup=False, highlight=False,
                                soft_wrap=True)

    def images(self, step: int, images: torch.Tensor, tag: str = "images", nrow: int | None = None) -> None:
        """Log a grid of images in [-1, 1] (TensorBoard and ``run_dir/images/<tag>_<step>.png``),
        ``nrow`` per row (default: a square-ish grid)."""
        if not self.enabled or images is None:
            return
        from torchvision.utils import make_grid, save_image

        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"image_fn must return a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
        grid = make_grid(((images.detach().float().cpu().clamp(-1, 1) + 1) / 2),
                         nrow=int(nrow) if nrow else max(1, math.ceil(math.sqrt(images.shape[0]))))
        if self._writer is not None:
            self._writer.add_image(tag, grid, step)
            self._writer.flush()
        out = self.run_dir / "images" / f"{tag}_{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)

    def _trim_metrics(self, start_step: int) -> None:
        if not self.metrics_file.is_file():
            return
        kept = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by kill -9
                continue
        write_text(self.metrics_file, "".join(ln + "\n" for ln in kept))


def _fmt(value: float) -> str:
    return f"{value:.3e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.4f}"
