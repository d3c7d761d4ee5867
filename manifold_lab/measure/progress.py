"""Progress bars and per-stage wall times for long measurement steps (rich)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageTracker:
    """Shows one progress bar per stage and records each stage's wall time in seconds."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
            transient=False,
        )

    def __enter__(self) -> "StageTracker":
        self.progress.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # on failure leave only the one-line error on the terminal
            self.progress.live.transient = True
        self.progress.stop()

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator["_Stage"]:
        task = self.progress.add_task(name, total=total)
        start = time.perf_counter()
        stage = _Stage(self.progress, task)
        try:
            yield stage
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            self.progress.update(task, completed=total if total is not None else 1, total=total or 1)


class _Stage:
    def __init__(self, progress: Progress, task) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)
