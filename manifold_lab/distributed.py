"""Thin helpers over ``torch.distributed`` that are no-ops in a single process.

Metric accumulators keep per-process partial sums or gathered rows and call :func:`all_reduce_sum`
or :func:`all_gather_rows` once, at ``compute()`` time, so the same code runs on one CPU and under
``torchrun`` (DDP, NCCL or gloo).
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes (returns ``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of ``t`` from every process (rows may differ in number per process)."""
    if not is_distributed():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    chunks = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(chunks, padded)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes)], dim=0)


def shutdown(wait: bool = True) -> None:
    """Destroy the process group, after a barrier when ``wait`` (no-op in a single process).

    Why: with torch 2.14 and gloo, a bare ``destroy_process_group()`` followed by exit aborted about
    one run in ten at interpreter finalisation ("terminate called without an active exception",
    SIGABRT after the results were written), which torchrun reports as a failed run. Either a
    barrier before the destroy or a garbage collection after it (so that no collective's work
    object is freed during finalisation) removed it in 50 of 50 runs each; both are cheap, so both
    are done. Pass ``wait=False`` on an error path, where the other ranks may never reach the
    barrier.
    """
    if not is_distributed():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
