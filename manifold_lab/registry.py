"""One small registry class, used once per kind of thing (tokenizers, encoders, datasets, ...).

Names map to factories registered in code (``@REGISTRY.register("name")``) or, for third-party
packages, to Python entry points in the registry's group. A config string never imports anything
by itself: only registered names resolve, and an unknown name lists the valid ones.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from manifold_lab.errors import ManifoldLabError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory mapping with optional entry-point discovery."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._factories: dict[str, Callable[..., T]] = {}
        self._entry_points_loaded = False

    def register(self, name: str, factory: Callable[..., T] | None = None):
        """Register ``factory`` under ``name``; usable as a decorator."""

        def _add(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories and self._factories[name] is not fn:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = fn
            return fn

        return _add(factory) if factory is not None else _add

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or not self.entry_point_group:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name not in self._factories:
                self._factories[ep.name] = _LazyEntryPoint(ep)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        self._load_entry_points()
        if name not in self._factories:
            raise ManifoldLabError(
                f"unknown {self.kind} '{name}'; valid names: {', '.join(self.names()) or '(none)'}"
            )
        factory = self._factories[name]
        if isinstance(factory, _LazyEntryPoint):
            factory = factory.load()
            self._factories[name] = factory
        return factory

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)


class _LazyEntryPoint:
    """An entry point that is imported only when its name is first used."""

    def __init__(self, ep) -> None:
        self.ep = ep

    def load(self):
        try:
            return self.ep.load()
        except Exception as exc:
            raise ManifoldLabError(
                f"entry point '{self.ep.name}' ({self.ep.value}) in group '{self.ep.group}' failed to "
                f"import: {type(exc).__name__}: {exc}"
            ) from exc
