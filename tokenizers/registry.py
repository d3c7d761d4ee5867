"""Which tokenizers exist, how to build and train each, and how third parties add their own.

Every tokenizer is described by a :class:`TokenizerSpec` registered under its name in
:data:`TOKENIZERS`. Built-ins register themselves when ``manifold_lab.tokenizers`` is imported;
a third-party package adds one through the ``manifold_lab.tokenizers`` entry-point group::

    [project.entry-points."manifold_lab.tokenizers"]
    mytok = "mytok.spec:SPEC"          # a TokenizerSpec, or a zero-argument callable returning one

Entry points are imported only when their name is first asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from manifold_lab.config import load_config, read_yaml
from manifold_lab.errors import ManifoldLabError
from manifold_lab.registry import Registry

#: loss(model, batch, step) -> (scalar loss tensor, {"name": float}) — what the training engine calls.
LossFn = Callable[[Any, Any, int], tuple[Any, dict[str, float]]]


@dataclass
class TokenizerSpec:
    """Everything the toolkit needs to know about one kind of tokenizer.

    ``build`` returns an untrained model from a ``config_cls`` instance. The training objective is
    either ``criterion`` -- ``criterion(config) -> nn.Module`` called as ``module(model, batch, step)
    -> (loss, logs)``, which may hold a discriminator (see :mod:`manifold_lab.train.gan`) -- or the
    plain function ``loss`` (None for both: cannot be trained here). ``prepare(model, recipe, dataset,
    run_dir, progress)`` is an optional stage run before the main training (PAE's refined targets); it
    must be resumable on its own (store its result atomically in ``run_dir`` and reuse it).
    ``default_recipe`` is the YAML recipe of the CPU default checkpoint, ``paper_recipe`` the paper-scale
    one; ``pretrained`` returns a ready tokenizer for packages that bring their own weights (then no
    training happens).
    """

    name: str
    config_cls: type
    build: Callable[[Any], Any]
    loss: LossFn | None = None
    default_recipe: str | Path | None = None
    pretrained: Callable[[], Any] | None = None
    description: str = ""
    criterion: Callable[[Any], Any] | None = None
    prepare: Callable[..., None] | None = None
    paper_recipe: str | Path | None = None

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config_cls):
            raise TypeError(f"TokenizerSpec '{self.name}': config_cls must be a dataclass type")


TOKENIZERS: Registry[Any] = Registry("tokenizer", entry_point_group="manifold_lab.tokenizers")


def register_tokenizer(spec: TokenizerSpec) -> TokenizerSpec:
    """Register a spec under ``spec.name`` (built-ins and code that does not use entry points)."""
    TOKENIZERS.register(spec.name, spec)
    return spec


def get_spec(name: str) -> TokenizerSpec:
    """The spec registered as ``name``; an unknown name raises one line listing the valid ones."""
    obj = TOKENIZERS.get(name)
    if not isinstance(obj, TokenizerSpec):
        if not callable(obj):
            raise ManifoldLabError(
                f"tokenizer '{name}' is registered as a {type(obj).__name__}, not a TokenizerSpec or a "
                "zero-argument function returning one; fix the entry point"
            )
        try:
            obj = obj()
        except TypeError as exc:
            raise ManifoldLabError(
                f"tokenizer '{name}': its entry point must be a TokenizerSpec or a zero-argument function "
                f"returning one ({exc})"
            ) from exc
        if not isinstance(obj, TokenizerSpec):
            raise ManifoldLabError(
                f"tokenizer '{name}': its entry point returned a {type(obj).__name__}, not a TokenizerSpec"
            )
    if obj.name != name:
        raise ManifoldLabError(
            f"tokenizer registered as '{name}' describes itself as '{obj.name}'; make the entry-point "
            "name and TokenizerSpec.name agree"
        )
    return obj


def list_tokenizers() -> list[str]:
    """Sorted names of the built-in and installed (entry-point) tokenizers."""
    return TOKENIZERS.names()


def build_tokenizer(name: str, config_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """An untrained tokenizer: the spec's config defaults <- ``config_path`` <- ``overrides``.

    ``config_path`` is a YAML file of the model config's keys; a training recipe (a file with a
    ``model:`` section) is accepted too, and then only its ``model`` section is used. Overrides are
    ``key=value`` strings on the model config (``z_channels=8``). Unknown keys are rejected with the
    list of valid ones.
    """
    spec = get_spec(name)
    base: dict[str, Any] | None = None
    path = config_path
    if config_path is not None:
        data = read_yaml(config_path)
        field_names = {f.name for f in dataclasses.fields(spec.config_cls)}
        if "model" in data and "model" not in field_names:
            base, path = data.get("model") or {}, None
            if not isinstance(base, dict):
                raise ManifoldLabError(f"{config_path}: the 'model' section must be a mapping")
    config = load_config(spec.config_cls, path, list(overrides), base=base)
    return spec.build(config)
