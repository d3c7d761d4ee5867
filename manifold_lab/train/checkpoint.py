"""Checkpoints, RNG states and the run-dir config record: everything a bit-exact resume needs.

A checkpoint is the folder ``run_dir/checkpoints/step_00001234/`` holding

* ``model.safetensors`` and ``ema.safetensors`` -- the raw model's and the EMA copy's state dicts;
* ``criterion.safetensors`` -- only when the training criterion is a module with state (a GAN
  discriminator): its state dict;
* ``state.pt`` -- optimizer, scheduler, step, world size and every process's RNG states (torch, CUDA,
  numpy, python ``random``), plus the discriminator's optimizer and scheduler when there is one
  (``disc_optimizer``, ``disc_scheduler``), stored as tensors, lists and numbers only, so it loads with
  ``torch.load(weights_only=True)`` (no pickle code execution).

The folder is written under a temporary name and renamed when complete (:func:`manifold_lab.io.atomic_dir`),
so ``kill -9`` at any moment leaves the previous checkpoint intact; stale temporaries are removed at the
next start. ``run_dir/config.json`` records the run's config; resuming with another config is refused.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from manifold_lab.errors import CheckpointError, ConfigError
from manifold_lab.io import atomic_dir, load_tensors, save_tensors, write_json

CKPT_DIRNAME = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------- RNG state
def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors/lists/numbers (safe for ``torch.load(weights_only=True)``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states are restored only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and python ``random`` from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- locations
def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT_DIRNAME


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first (temporaries start with '.' and are skipped)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete half-written checkpoint folders left by a killed process."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith("."):
                shutil.rmtree(child, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints, delete the rest."""
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------- save / load
def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # Clone so tied weights become separate tensors (safetensors refuses shared storage).
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def has_state(module: Any) -> bool:
    """Whether ``module`` is an ``nn.Module`` with a non-empty state dict (worth a checkpoint file)."""
    return isinstance(module, nn.Module) and len(module.state_dict()) > 0


def save_checkpoint(path: str | Path, *, step: int, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rng: list[dict[str, Any]],
                    world_size: int = 1, criterion: nn.Module | None = None,
                    disc_optimizer: torch.optim.Optimizer | None = None, disc_scheduler: Any = None) -> Path:
    """Write one complete checkpoint folder atomically; returns its path.

    ``criterion`` (a training criterion with state, e.g. holding a discriminator) goes to
    ``criterion.safetensors``; ``disc_optimizer``/``disc_scheduler`` into ``state.pt``.
    """
    path = Path(path)
    state = {"format": FORMAT_VERSION, "step": int(step), "world_size": int(world_size),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
    if disc_optimizer is not None:
        state["disc_optimizer"] = disc_optimizer.state_dict()
    if disc_scheduler is not None:
        state["disc_scheduler"] = disc_scheduler.state_dict()
    with atomic_dir(path) as tmp:
        meta = {"step": str(step), "format": str(FORMAT_VERSION)}
        save_tensors(tmp / "model.safetensors", _cpu_state(model), metadata=meta)
        save_tensors(tmp / "ema.safetensors", _cpu_state(ema), metadata=meta)
        if has_state(criterion):
            save_tensors(tmp / "criterion.safetensors", _cpu_state(criterion), metadata=meta)
        torch.save(state, tmp / "state.pt")
    return path


def _load_module(module: nn.Module, file: Path, device: torch.device | str) -> None:
    tensors = load_tensors(file, device=str(device))
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise CheckpointError(f"checkpoint {file} does not fit the model ({first}); "
                              "use the model config it was trained with or a new run dir") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {file} does not fit the model (missing keys {missing[:3]}, "
                              f"unexpected keys {unexpected[:3]}); use the matching model config or a new run dir")


def load_checkpoint(path: str | Path, *, model: nn.Module, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    device: torch.device | str = "cpu", criterion: nn.Module | None = None,
                    disc_optimizer: torch.optim.Optimizer | None = None,
                    disc_scheduler: Any = None) -> dict[str, Any]:
    """Load a checkpoint folder into the given objects; returns the ``state.pt`` dict (step, rng, ...).

    A criterion with state needs the checkpoint's ``criterion.safetensors``, a discriminator optimizer
    its ``disc_optimizer`` entry (one-line :class:`CheckpointError` otherwise).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    state_file = path / "state.pt"
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no state.pt (incomplete or corrupt); delete it to "
                              "resume from an earlier one, or use a new run dir")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {state_file} is corrupt ({type(exc).__name__}); delete the folder "
                              f"{path.name} to resume from an earlier checkpoint, or use a new run dir") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "step" not in state:
        raise CheckpointError(f"checkpoint {state_file} is not a manifold-lab training state "
                              f"(format {FORMAT_VERSION}); use a new run dir")
    _load_module(model, path / "model.safetensors", device)
    if ema is not None:
        _load_module(ema, path / "ema.safetensors", device)
    if has_state(criterion):
        if not (path / "criterion.safetensors").is_file():
            raise CheckpointError(f"checkpoint {path} has no criterion.safetensors but the training criterion "
                                  "has state (a GAN discriminator); it was written by a run without one: use "
                                  "its config or a new run dir")
        _load_module(criterion, path / "criterion.safetensors", device)
    if disc_optimizer is not None and "disc_optimizer" not in state:
        raise CheckpointError(f"checkpoint {state_file} has no discriminator optimizer state; it was written by "
                              "a run without a GAN discriminator: use its config or a new run dir")
    try:
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if disc_optimizer is not None:
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        if disc_scheduler is not None and "disc_scheduler" in state:
            disc_scheduler.load_state_dict(state["disc_scheduler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"optimizer state in {state_file} does not fit this model ({reason}); "
                              "use a new run dir") from None
    return state


# ----------------------------------------------------------------------------------------- config record
def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, tuple):
        obj = list(obj)
    return {prefix: obj}


def ensure_same_config(run_dir: str | Path, record: dict[str, Any], ignore: tuple[str, ...] = (),
                       write: bool = True) -> None:
    """Write ``run_dir/config.json`` on the first start; on a restart refuse a different config.

    Keys listed in ``ignore`` (dotted) may change between restarts (e.g. how often to log).
    """
    run_dir = Path(run_dir)
    file = run_dir / "config.json"
    # A JSON round trip makes tuples lists and keys strings, as in the stored file.
    record = json.loads(json.dumps(record, default=str))
    if file.is_file():
        try:
            stored = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"{file} is unreadable; restore it or use a new run dir") from None
        old, new = _flatten(stored), _flatten(record)
        absent = object()
        diff = sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k, absent) != new.get(k, absent))
        if diff:
            shown = ", ".join(diff[:8]) + (f", ... ({len(diff)} in all)" if len(diff) > 8 else "")
            raise ConfigError(f"run dir {run_dir} holds a run with a different config (keys: {shown}); "
                              "use a new run dir")
        if write and old != new:  # only ignored keys changed: record the latest values
            write_json(file, record)
    elif write:
        write_json(file, record)
