"""The data stream: an endless, deterministic order of samples whose position is a function of the step.

Every epoch is a fresh permutation of the dataset drawn from a generator seeded by ``(seed, epoch)``;
the epochs are concatenated into one endless stream of sample positions. Micro-batch ``k`` of the whole
job covers stream positions ``[k * B * W, (k + 1) * B * W)`` (``B`` samples per process, ``W``
processes) and process ``r`` takes the ``r``-th slice of ``B``. Hence:

* resuming at optimizer step ``s`` starts at micro-batch ``s * grad_accum`` -- exactly the sample an
  uninterrupted run would read next, no matter where the epoch boundary fell;
* ``W`` processes with ``B`` each read the same samples per micro-batch as one process with ``B * W``,
  and ``grad_accum`` micro-batches of ``B`` the same as one of ``B * grad_accum``.

This plays the role of ``DistributedSampler`` (per-rank shards, a seed+epoch shuffle) but never pads or
drops samples at epoch ends and can start mid-epoch, which ``DistributedSampler`` cannot.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from manifold_lab.errors import DataError


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit generator seed for ``(seed, epoch)`` (no collisions like ``seed + epoch``)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class StreamBatchSampler(Sampler[list[int]]):
    """Endless batches of dataset indices for one process, starting at micro-batch ``start_batch``."""

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0) -> None:
        if dataset_len <= 0:
            raise DataError("the training dataset is empty; point the config at a folder with samples")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        """The shuffled order of epoch ``epoch`` (the last two epochs are cached)."""
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._cache[epoch] = torch.randperm(self.dataset_len, generator=gen)
            for old in [e for e in self._cache if e < epoch - 1]:
                del self._cache[old]
        return self._cache[epoch]

    def batch_indices(self, batch: int) -> list[int]:
        """Dataset indices of this process's share of micro-batch ``batch`` (a pure function)."""
        start = (batch * self.world_size + self.rank) * self.batch_size
        out: list[int] = []
        pos, end = start, start + self.batch_size
        while pos < end:
            epoch, offset = divmod(pos, self.dataset_len)
            take = min(end - pos, self.dataset_len - offset)
            out.extend(self.permutation(epoch)[offset:offset + take].tolist())
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start_batch
        while True:
            yield self.batch_indices(batch)
            batch += 1


def make_loader(dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, start_batch: int,
                num_workers: int = 0, pin_memory: bool = False) -> Iterator[Any]:
    """An endless iterator over collated micro-batches, beginning at micro-batch ``start_batch``.

    The loader gets its own generator (seeded from ``seed`` and ``start_batch``): otherwise creating
    it would draw from the global torch RNG and a resumed run would diverge from an uninterrupted one.
    """
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(f"the training dataset ({type(dataset).__name__}) must be a map-style dataset with "
                        "__len__ and __getitem__ so its order can be resumed; wrap it in a torch Dataset")
    sampler = StreamBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_batch)
    generator = torch.Generator().manual_seed(epoch_seed(seed + 1, start_batch))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        generator=generator)
    return iter(loader)


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a (nested) tuple/list/dict batch to ``device``; other leaves are kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(v, device, non_blocking) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch
