"""Encode a dataset once into latent shards for diffusion training (``manifold-lab cache-latents``).

Why a cache: a diffusion model sees every image many times, and encoding (a frozen VFM at 128 px for
PAE, a conv encoder for the VAE) costs more than a small DiT step. LightningDiT and RAE do the same.

Layout of a cache folder::

    meta.json                 what is inside and how it was made (tokenizer fingerprint, dataset,
                              latent shape, number of items, shard size, normalisation statistics)
    shard-00000.safetensors   latents [n,C,h,w] (raw encode() output, float32), latents_flip
                              (encode of the horizontally flipped image), labels [n] (int64),
                              index [n] (position in the dataset)
    ...

* Shards are written atomically one at a time, so a killed run keeps what it finished and a rerun
  encodes only the missing shards. A folder made for another tokenizer, dataset or settings is
  refused with one line instead of silently mixing latents.
* Under ``torchrun`` shard ``k`` is encoded by rank ``k % world_size``; rank 0 writes ``meta.json``
  once every shard exists, so ``meta.json`` present means the cache is complete.
* Normalisation: the diffusion model trains on per-channel standardised latents. The statistics are
  the tokenizer's own (``tokenizer.latent_stats``, computed when it was trained) unless those are
  still the identity, in which case they are computed here over the first ``stats_items`` cached
  latents (float64 sums) and the ``how`` line in ``meta.json`` says so.
* Latents are stored raw and normalised when read (:class:`LatentDataset`), so one cache serves any
  choice of statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from manifold_lab import distributed
from manifold_lab.errors import ConfigError, ManifoldLabError
from manifold_lab.io import load_tensors, save_tensors, write_json
from manifold_lab.tokenizers.base import LatentStats

META_FILE = "meta.json"
FORMAT_NAME = "manifold-lab-latent-cache"
FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's name, config, weights and latent statistics (16 hex digits).

    Two caches (or DiTs) made from different weights never share a key, whatever the file they came
    from; hashing every tensor costs ~1 s for a 300M-parameter tokenizer.
    """
    h = hashlib.sha256()
    h.update(str(getattr(tokenizer, "name", type(tokenizer).__name__)).encode())
    config = getattr(tokenizer, "config", None)
    if config is not None:
        from manifold_lab.config import to_dict

        try:
            h.update(json.dumps(to_dict(config), sort_keys=True, default=str).encode())
        except TypeError:
            h.update(repr(config).encode())
    state = tokenizer.state_dict() if hasattr(tokenizer, "state_dict") else {}
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim buffers too
    stats = getattr(tokenizer, "latent_stats", None)
    if stats is not None:
        h.update(json.dumps(stats.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _is_identity_stats(stats: Any) -> bool:
    return bool(torch.all(stats.mean == 0) and torch.all(stats.std == 1))


def _item_image_label(item: Any) -> tuple[torch.Tensor, int]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ManifoldLabError("cache-latents needs a labelled dataset (items (image, label, ...)); "
                               "class-conditional diffusion needs the class labels")
    label = item[-1] if not torch.is_tensor(item[-1]) or item[-1].ndim == 0 else item[1]
    return item[0], int(label)


class _Encodable(Dataset):
    """(image, label, index) from the chosen subset of the dataset (the mask of scene datasets dropped)."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = _item_image_label(self.dataset[self.indices[i]])
        return image, label, self.indices[i]


def cache_key_record(tokenizer: Any, dataset_key: str, num_items: int, shard_size: int, seed: int) -> dict[str, Any]:
    """What identifies a cache's contents; a folder with another record is refused."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": str(getattr(tokenizer, "name", type(tokenizer).__name__)),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_key,
        "num_items": int(num_items),
        "shard_size": int(shard_size),
        "seed": int(seed),
        "latent_shape": [int(v) for v in tokenizer.latent_shape],
    }


def dataset_key(dataset: Dataset) -> str:
    """A readable key for a dataset: its ``cache_key()`` when it has one, else name/split/size/length."""
    if callable(getattr(dataset, "cache_key", None)):
        return str(dataset.cache_key())
    parts = [getattr(dataset, "name", type(dataset).__name__), getattr(dataset, "split", None),
             getattr(dataset, "image_size", None), len(dataset)]
    return "_".join(str(p) for p in parts if p is not None)


def cache_latents(tokenizer: Any, dataset: Dataset, out_dir: str | Path, *, num_items: int | None = None,
                  batch_size: int = 256, shard_size: int = 8192, flip: bool = True, seed: int = 0,
                  stats_items: int = 10_000, progress: Callable[[int, int], None] | None = None,
                  device: torch.device | str | None = None) -> "LatentCache":
    """Encode ``num_items`` images of ``dataset`` (all when None) into ``out_dir``; resumable; returns the cache.

    The images are the first ``num_items`` of a permutation of the dataset seeded by ``seed`` (the
    dataset order itself when ``num_items`` covers it all), so a subset is a fair sample of classes.
    ``flip`` also stores the latents of the horizontally flipped images (doubling the training set).
    """
    out = Path(out_dir)
    total = len(dataset)
    if total == 0:
        raise ManifoldLabError("cache-latents: the dataset is empty; point it at a folder with images")
    n = total if num_items is None else min(int(num_items), total)
    if n < 1:
        raise ConfigError(f"cache-latents: num_items must be >= 1, got {num_items}")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError("cache-latents: shard_size and batch_size must be >= 1")
    record = cache_key_record(tokenizer, dataset_key(dataset), n, shard_size, seed)
    record["flip"] = bool(flip)
    meta_path = out / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        _check_same(meta, record, out)
        return LatentCache(out)
    _check_partial(out, record)
    if n == total:
        indices = list(range(total))
    else:
        indices = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()
    if device is None:
        param = next(iter(tokenizer.parameters()), None) if hasattr(tokenizer, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
    tokenizer.eval()
    num_shards = math.ceil(n / shard_size)
    rank, world = distributed.rank(), distributed.world_size()
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "partial.json", record)
    distributed.barrier()
    done = sum(min(shard_size, n - k * shard_size) for k in range(num_shards) if _shard_path(out, k).is_file())
    t0 = time.perf_counter()
    for k in range(num_shards):
        if k % world != rank or _shard_path(out, k).is_file():
            continue
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        tensors = _encode_shard(tokenizer, _Encodable(dataset, indices[lo:hi]), batch_size, flip, device,
                                lambda d: progress(done + d, n) if progress else None)
        save_tensors(_shard_path(out, k), tensors, metadata={"format": FORMAT_NAME})
        done += hi - lo
    distributed.barrier()
    if distributed.is_main_process():
        stats = _stats(tokenizer, out, num_shards, stats_items)
        meta = dict(record)
        meta.update({"num_shards": num_shards, "stats": stats.to_json(),
                     "encode_seconds": round(time.perf_counter() - t0, 1),
                     "note": "latents are raw encode() outputs; LatentDataset normalises them with 'stats'"})
        write_json(meta_path, meta)
        (out / "partial.json").unlink(missing_ok=True)
    distributed.barrier()
    return LatentCache(out)


def _shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.safetensors"


def _check_same(meta: dict[str, Any], record: dict[str, Any], out: Path) -> None:
    diff = [k for k, v in record.items() if meta.get(k) != v]
    if diff:
        raise ManifoldLabError(f"latent cache {out} was made with other settings ({', '.join(diff)} differ); "
                               "pass another --out folder or delete it")


def _check_partial(out: Path, record: dict[str, Any]) -> None:
    partial = out / "partial.json"
    if partial.is_file():
        _check_same(json.loads(partial.read_text()), record, out)
    elif out.is_dir() and any(out.glob("shard-*.safetensors")):
        raise ManifoldLabError(f"{out} holds latent shards but no partial.json/meta.json; delete it or pass another "
                               "--out folder")


@torch.no_grad()
def _encode_shard(tokenizer: Any, items: Dataset, batch_size: int, flip: bool, device: Any,
                  progress: Callable[[int], None]) -> dict[str, torch.Tensor]:
    latents, flipped, labels, index = [], [], [], []
    done = 0
    for x, y, idx in DataLoader(items, batch_size=batch_size, shuffle=False):
        x = x.to(device)
        z = tokenizer.encode(x).float()
        if not bool(torch.isfinite(z).all()):
            raise ManifoldLabError(f"the tokenizer produced NaN/inf latents for dataset items {idx[:4].tolist()}...; "
                                   "check the checkpoint")
        latents.append(z.cpu())
        if flip:
            flipped.append(tokenizer.encode(torch.flip(x, dims=[-1])).float().cpu())
        labels.append(y.long())
        index.append(idx.long())
        done += len(x)
        progress(done)
    out = {"latents": torch.cat(latents), "labels": torch.cat(labels), "index": torch.cat(index)}
    if flip:
        out["latents_flip"] = torch.cat(flipped)
    return out


def _stats(tokenizer: Any, out: Path, num_shards: int, stats_items: int) -> LatentStats:
    own = getattr(tokenizer, "latent_stats", None)
    if own is not None and not _is_identity_stats(own):
        return LatentStats(own.mean, own.std, f"the tokenizer's own: {own.how}")
    seen = {"items": 0}

    def latents():
        for k in range(num_shards):
            z = load_tensors(_shard_path(out, k))["latents"][: max(0, stats_items - seen["items"])]
            if len(z) == 0:
                return
            seen["items"] += len(z)
            yield z

    moments = LatentStats.from_latents(latents(), how="")
    return LatentStats(moments.mean, moments.std, f"per-channel mean/std over the first {seen['items']:,} cached "
                       "latents (the tokenizer had none)")


class LatentCache:
    """A complete cache folder: its metadata, statistics and shards."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            hint = " (it is incomplete: rerun cache-latents to finish it)" if (self.folder / "partial.json").is_file() \
                else ""
            raise ManifoldLabError(f"no latent cache in {self.folder}{hint}; make one with `manifold-lab cache-latents`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifoldLabError(f"{meta_path} is not valid JSON ({exc.msg}); delete the cache and rerun "
                                   "cache-latents") from exc
        if self.meta.get("format") != FORMAT_NAME:
            raise ManifoldLabError(f"{self.folder} is not a manifold-lab latent cache")
        s = self.meta["stats"]
        self.stats = LatentStats(s["mean"], s["std"], s["how"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta["latent_shape"])  # type: ignore[return-value]

    @property
    def num_items(self) -> int:
        return int(self.meta["num_items"])

    @property
    def has_flip(self) -> bool:
        return bool(self.meta.get("flip"))

    def load(self) -> dict[str, torch.Tensor]:
        """Every shard concatenated (latents, latents_flip, labels, index) in cache order."""
        parts = [load_tensors(_shard_path(self.folder, k)) for k in range(int(self.meta["num_shards"]))]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


class LatentDataset(Dataset):
    """Normalised cached latents and labels for training: item ``i`` is ``(z, label, i)``.

    With flips the dataset has ``2N`` items: ``i < N`` the original latents, ``i >= N`` the latents of
    the flipped images (deterministic, so DDP sharding and resume need no extra RNG). The third
    element is the item index; the training loss seeds each sample's noise with it, which makes a
    step's result independent of the number of processes.

    Small caches (under ``max_memory_bytes``, e.g. the embedded 40k x 8x8x8) are read into memory
    once; bigger ones (ImageNet: 1.28M x 32x16x16 is 42 GB per orientation) are read item by item
    from the memory-mapped shards, so a DataLoader worker never holds more than the OS page cache.
    """

    def __init__(self, cache: LatentCache | str | Path, flip: bool = True,
                 max_memory_bytes: int = 4 << 30) -> None:
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        self.flip = bool(flip and self.cache.has_flip)
        self.n = self.cache.num_items
        self.shard_size = int(self.cache.meta["shard_size"])
        self.num_shards = int(self.cache.meta["num_shards"])
        c, h, w = self.cache.latent_shape
        nbytes = self.n * c * h * w * 4 * (2 if self.flip else 1)
        self._mean, self._std = (v.view(-1, 1, 1) for v in (self.cache.stats.mean, self.cache.stats.std))
        self._handles: dict[int, Any] = {}
        self.latents: torch.Tensor | None = None
        labels = [load_tensors(_shard_path(self.cache.folder, k))["labels"] if nbytes <= max_memory_bytes
                  else self._open(k).get_tensor("labels") for k in range(self.num_shards)]
        self.labels = torch.cat(labels).long()
        if nbytes <= max_memory_bytes:
            data = self.cache.load()
            z = [data["latents"]] + ([data["latents_flip"]] if self.flip else [])
            self.latents = ((torch.cat(z).float() - self._mean) / self._std).contiguous()
            self._handles = {}
        self.name = f"latents of {self.cache.meta['dataset']} ({self.cache.meta['tokenizer']})"

    def _open(self, k: int) -> Any:
        if k not in self._handles:
            from safetensors import safe_open

            self._handles[k] = safe_open(str(_shard_path(self.cache.folder, k)), framework="pt")
        return self._handles[k]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return self.n * (2 if self.flip else 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        label = int(self.labels[i % self.n])
        if self.latents is not None:
            return self.latents[i], label, i
        j = i % self.n
        key = "latents_flip" if i >= self.n else "latents"
        k, row = divmod(j, self.shard_size)
        z = self._open(k).get_slice(key)[row:row + 1][0].float()
        return (z - self._mean) / self._std, label, i

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


__all__ = ["LatentCache", "LatentDataset", "cache_latents", "tokenizer_fingerprint",
           "dataset_key"]
