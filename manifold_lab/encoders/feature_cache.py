"""Features of a frozen network over a dataset, computed once and kept on disk in shards.

Reference statistics (FID reference sets, VFM targets for tokenizer training, probe features) are
expensive and never change for a given (network, weights, dataset, transform). They are stored as
safetensors shards under::

    <cache_dir>/<readable prefix>-<sha256 of the key parts>/
        manifest.json           the key parts, item count, shard size, shard count, "complete"
        shard_00000.safetensors {"features": [n, ...], "labels": [n] (when the dataset has labels)}
        ...

``cache_dir`` defaults to ``$MANIFOLD_LAB_CACHE/features``, else ``~/.cache/manifold-lab/features``.
Each shard is written atomically (:func:`manifold_lab.io.save_tensors`), so a killed run leaves
only whole shards; the next call loads those and computes only the missing ones. A shard that
cannot be read (or has the wrong row count) is recomputed. The key includes the shard size and the
dataset length, so different shardings never mix.

Which identities go into the key is the caller's job: ``fn_key`` should name the network and the
content of its weights (e.g. :meth:`FrozenEncoder.identity`), ``dataset_key`` the data and split
(e.g. a dataset's ``cache_key``), ``transform_key`` any preprocessing applied before ``fn``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from manifold_lab.errors import CheckpointError, DataError
from manifold_lab.io import load_tensors, save_tensors, write_json

FORMAT = "manifold-lab-feature-cache"
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("MANIFOLD_LAB_CACHE")
    return (Path(root).expanduser() if root else Path("~/.cache/manifold-lab").expanduser()) / "features"


def _label_of(item: Any) -> int | None:
    """The class label of a dataset item: its last element when that is an int or 0-d tensor."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        return None
    last = item[-1]
    if isinstance(last, bool):
        return None
    if isinstance(last, int):
        return last
    if isinstance(last, torch.Tensor) and last.ndim == 0 and not last.is_floating_point():
        return int(last)
    return None


def _images_of(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _labels_of(batch: Any) -> torch.Tensor | None:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    last = batch[-1]
    if isinstance(last, torch.Tensor) and last.ndim == 1 and not last.is_floating_point() \
            and last.dtype != torch.bool:
        return last.to(torch.int64)
    return None


def cache_folder(fn_key: str, dataset_key: str, transform_key: str, num_items: int, shard_size: int,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """The folder of one cache entry and the key parts that name it."""
    parts = {"fn_key": fn_key, "dataset_key": dataset_key, "transform_key": transform_key,
             "num_items": int(num_items), "shard_size": int(shard_size)}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{fn_key.split('|')[0]}__{dataset_key}")[:80].strip("_")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{readable}-{digest}", parts


def cached_features(fn: Callable[[torch.Tensor], torch.Tensor], fn_key: str, dataset: Dataset,
                    dataset_key: str, transform_key: str = "", batch_size: int = 256, shard_size: int = 8192,
                    cache_dir: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    device: torch.device | str | None = None) -> dict[str, torch.Tensor | None]:
    """Features ``fn(images)`` for every item of ``dataset``, in order, from the cache or computed once.

    ``dataset[i]`` is an image tensor or a tuple whose first element is the image; when the last
    element is an integer class label, labels are stored too. Images are batched with the default
    collate, moved to ``device`` if given, and ``fn`` runs under ``torch.no_grad``; its output rows
    are stored as CPU tensors. ``progress(done, total)`` is called after each batch.

    Returns ``{"features": Tensor [N, ...], "labels": LongTensor [N] or None}``.
    """
    n = len(dataset)
    if n == 0:
        raise DataError(f"dataset '{dataset_key}' is empty; nothing to compute features for")
    if batch_size < 1 or shard_size < 1:
        raise DataError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    folder, parts = cache_folder(fn_key, dataset_key, transform_key, n, shard_size, cache_dir)
    num_shards = (n + shard_size - 1) // shard_size
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **parts, "num_shards": num_shards,
                "complete": False}
    manifest_path = folder / "manifest.json"
    complete = False
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
            complete = bool(old.get("complete")) and all(old.get(k) == v for k, v in parts.items())
        except (OSError, ValueError):
            complete = False
    if not complete:
        write_json(manifest_path, manifest)

    has_labels = _label_of(dataset[0]) is not None
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    done = 0
    rebuilt = False
    for s in range(num_shards):
        start, stop = s * shard_size, min(n, (s + 1) * shard_size)
        path = folder / f"shard_{s:05d}.safetensors"
        shard = _read_shard(path, stop - start, has_labels)
        if shard is None:
            shard = _compute_shard(fn, dataset, start, stop, batch_size, has_labels, device,
                                   lambda k: progress(done + k, n) if progress else None)
            save_tensors(path, shard, metadata={"fn_key": fn_key[:500], "dataset_key": dataset_key[:500]})
            rebuilt = True
        feats.append(shard["features"])
        if has_labels:
            labels.append(shard["labels"])
        done = stop
        if progress is not None:
            progress(done, n)
    if rebuilt or not complete:
        write_json(manifest_path, {**manifest, "complete": True})
    return {"features": torch.cat(feats), "labels": torch.cat(labels) if has_labels else None}


def _read_shard(path: Path, rows: int, has_labels: bool) -> dict[str, torch.Tensor] | None:
    """A stored shard if it is whole and consistent, else None (it will be recomputed)."""
    if not path.is_file():
        return None
    try:
        shard = load_tensors(path)
    except CheckpointError:
        return None
    if "features" not in shard or shard["features"].shape[0] != rows:
        return None
    if has_labels and ("labels" not in shard or shard["labels"].shape[0] != rows):
        return None
    return shard


def _compute_shard(fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, start: int, stop: int,
                   batch_size: int, has_labels: bool, device: torch.device | str | None,
                   progress: Callable[[int], None]) -> dict[str, torch.Tensor]:
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False)
    feats, labels = [], []
    seen = 0
    with torch.no_grad():
        for batch in loader:
            images = _images_of(batch)
            if device is not None:
                images = images.to(device)
            out = fn(images)
            if not isinstance(out, torch.Tensor) or out.shape[0] != images.shape[0]:
                raise DataError(
                    f"feature function returned {type(out).__name__} "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''} for a batch of "
                    f"{images.shape[0]}; it must return one row per image"
                )
            feats.append(out.detach().to("cpu"))
            if has_labels:
                lab = _labels_of(batch)
                if lab is None:
                    raise DataError("dataset items stopped carrying integer labels part-way; labels must be uniform")
                labels.append(lab)
            seen += images.shape[0]
            progress(seen)
    shard = {"features": torch.cat(feats)}
    if has_labels:
        shard["labels"] = torch.cat(labels)
    return shard
