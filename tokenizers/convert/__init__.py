"""Converters from released tokenizer checkpoints (official layouts) to manifold-lab tokenizers.

Each converter module registers ``name -> convert(src, **options) -> TokenizerBase`` in
:data:`CONVERTERS`; :func:`convert_checkpoint` runs one and saves the result in the manifold-lab
format (``Tokenizer.save``), after which ``manifold-lab measure --checkpoint DST`` profiles it.
Released files are read with ``safetensors`` or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from manifold_lab.io import atomic_dir
from manifold_lab.registry import Registry

CONVERTERS: Registry[Callable[..., Any]] = Registry("checkpoint converter")

#: converter name -> module that registers it (imported on first use).
_MODULES = {"vae-ldm": "vavae", "vavae": "vavae", "rae": "rae", "pae": "pae"}


def get_converter(name: str) -> Callable[..., Any]:
    module = _MODULES.get(name)
    if module is not None:
        importlib.import_module(f"manifold_lab.tokenizers.convert.{module}")
    return CONVERTERS.get(name)


def convert_checkpoint(name: str, src: str | Path, dst: str | Path, **options: Any) -> Any:
    """Convert the released checkpoint ``src`` with converter ``name``; save to ``dst`` atomically."""
    tokenizer = get_converter(name)(src, **options)
    with atomic_dir(Path(dst)) as tmp:
        tokenizer.save(tmp)
    return tokenizer


__all__ = ["CONVERTERS", "convert_checkpoint", "get_converter"]
