"""The training loop shared by every trainer in the package (see :mod:`manifold_lab.train`)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from manifold_lab import distributed
from manifold_lab.config import to_dict
from manifold_lab.errors import ManifoldLabError
from manifold_lab.train.checkpoint import (capture_rng, checkpoint_path, ensure_same_config, latest_checkpoint,
                                           load_checkpoint, prune_checkpoints, remove_stale_temporaries,
                                           restore_rng, save_checkpoint, seed_everything)
from manifold_lab.train.config import OptimConfig, TrainConfig
from manifold_lab.train.data import make_loader, move_to_device
from manifold_lab.train.device import autocast_context, resolve_device
from manifold_lab.train.ema import ema_update, make_ema
from manifold_lab.train.run_log import RunLogger
from manifold_lab.train.schedule import build_optimizer, build_scheduler

LossFn = Callable[[nn.Module, Any, int], "tuple[torch.Tensor, dict[str, float]]"]
ImageFn = Callable[[nn.Module, int], "torch.Tensor | tuple[torch.Tensor, int] | None"]

# Settings that do not change the trained weights, so a restart may change them.
RESUME_SAFE_KEYS = ("train.log_every", "train.tensorboard")


def unwrap_model(module: nn.Module) -> nn.Module:
    """The plain model inside ``torch.compile`` and/or DDP wrappers (for attributes and custom methods)."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, DistributedDataParallel):
            module = module.module
        else:
            return module


class Trainer:
    """Train ``model`` on ``dataset`` by minimising ``loss_fn``; resumable, DDP-aware, EMA-tracking.

    ``loss_fn(model, batch, step) -> (loss, logs)`` gets the training module (DDP-wrapped and/or
    compiled when enabled), a micro-batch already on the device, and the 0-based optimizer step being
    taken. It must call the model through ``model(...)`` (DDP synchronises gradients in ``forward``);
    reach other attributes with :func:`unwrap_model`. ``loss`` is a scalar mean over the micro-batch;
    ``logs`` holds floats or 0-d tensors, averaged over the steps between two log lines.

    ``image_fn(model, step)`` (optional) gets the raw model in eval mode under ``no_grad`` at every
    checkpoint and returns images in [-1, 1] to log as a grid (or None), or ``(images, nrow)`` to fix
    the images per grid row (e.g. ``nrow = N`` for N originals followed by their N reconstructions:
    originals on the top row, reconstructions below); it runs on rank 0 only and the RNG state is
    restored afterwards, so it never changes the training trajectory.

    ``run_config`` (optional) is the rest of the run's config (model, data, ...): it is recorded in
    ``run_dir/config.json`` next to the train config and a restart with different values is refused.

    A ``loss_fn`` that is an ``nn.Module`` (a tokenizer's criterion) is moved to the device and its
    state is checkpointed (``criterion.safetensors``). When it also has ``discriminator_loss(step)`` and
    trainable discriminator parameters (``discriminator_parameters()``, else all its trainable
    parameters), the trainer owns a second AdamW for them (``discriminator_optim_config()``, default
    constant lr 1e-4, betas (0.5, 0.9)) and, after every generator optimizer step, takes one
    discriminator step: ``discriminator_loss(step)`` once per micro-batch of that step (the criterion
    remembers its (x, recon) pairs), backward of ``loss / pairs`` (= ``grad_accum``) so the
    micro-batches accumulate like one big batch, then under DDP an all-reduce (average) of the
    discriminator's gradients, then the step. The discriminator is deliberately not wrapped in DDP: it
    also runs (frozen) inside the generator's forward, and a DDP module used in a forward whose backward
    produces no gradients for it breaks DDP's reducer (unused-parameter errors, or
    ``find_unused_parameters`` scans every step); a single all-reduce of one flat gradient buffer per
    step is simpler and exact. Its optimizer and schedule are checkpointed in ``state.pt``; its logs
    (``gan_d``, ``logits_real``, ``logits_fake``) join the run's scalars.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, dataset: Dataset, cfg: TrainConfig,
                 run_dir: str | Path, progress: bool = True, image_fn: ImageFn | None = None, *,
                 run_config: dict[str, Any] | None = None, find_unused_parameters: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.loss_fn = loss_fn
        self.dataset = dataset
        self.image_fn = image_fn
        self.progress = progress
        self.run_config = run_config
        distributed.init_from_env()
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.criterion: nn.Module | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None
        self.disc_scheduler = None
        if isinstance(loss_fn, nn.Module):
            self.criterion = loss_fn.to(self.device)
            self._build_discriminator_optimizer(self.criterion, cfg)
        self.step = 0
        self.start_step = 0
        self._ddp: DistributedDataParallel | None = None
        module: nn.Module = self.model
        if distributed.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=ids,
                                                find_unused_parameters=find_unused_parameters)
            module = self._ddp
        # after the DDP wrap, which copies rank 0's weights to every rank, so all EMAs start equal
        self.ema = make_ema(self.model)
        self.train_module = torch.compile(module) if cfg.compile else module

    def _build_discriminator_optimizer(self, criterion: nn.Module, cfg: TrainConfig) -> None:
        if not callable(getattr(criterion, "discriminator_loss", None)):
            return
        if callable(getattr(criterion, "discriminator_parameters", None)):
            params = [p for p in criterion.discriminator_parameters() if p.requires_grad]
        else:
            params = [p for p in criterion.parameters() if p.requires_grad]
        if not params:
            return
        optim_cfg = None
        if callable(getattr(criterion, "discriminator_optim_config", None)):
            optim_cfg = criterion.discriminator_optim_config()
        if optim_cfg is None:
            optim_cfg = OptimConfig(lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, schedule="constant")
        self._disc_params = params
        self.disc_optimizer = build_optimizer(params, optim_cfg)
        self.disc_scheduler = build_scheduler(self.disc_optimizer, optim_cfg, cfg.steps)

    # ------------------------------------------------------------------ run dir / resume
    def config_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"train": to_dict(self.cfg)}
        if self.run_config is not None:
            record["run"] = self.run_config
        return record

    def _prepare(self) -> None:
        """Check/record the config, then resume from the last checkpoint or seed a fresh run."""
        ensure_same_config(self.run_dir, self.config_record(), ignore=RESUME_SAFE_KEYS, write=self.is_main)
        if self.is_main:
            remove_stale_temporaries(self.run_dir)
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            self.step = 0
            seed_everything(self.cfg.seed + self.rank)
        else:
            state = self.load_checkpoint(ckpt)
            rngs = state.get("rng") or []
            if state.get("world_size") == self.world_size and self.rank < len(rngs):
                restore_rng(rngs[self.rank])
            else:  # world size changed: fresh but deterministic streams
                seed_everything(self.cfg.seed + self.rank + 7919 * self.step)
        self.start_step = self.step

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Load model, EMA, optimizer, scheduler and step from a checkpoint folder (RNG left to the caller)."""
        state = load_checkpoint(path, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                scheduler=self.scheduler, device=self.device, criterion=self.criterion,
                                disc_optimizer=self.disc_optimizer, disc_scheduler=self.disc_scheduler)
        self.step = int(state["step"])
        return state

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint of the current step (collective under DDP; rank 0 writes)."""
        rng = capture_rng()
        rngs = [rng]
        if distributed.is_distributed():
            rngs = [None] * self.world_size
            torch.distributed.all_gather_object(rngs, rng)
        if not self.is_main:
            return None
        path = save_checkpoint(checkpoint_path(self.run_dir, self.step), step=self.step, model=self.model,
                               ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler, rng=rngs,
                               world_size=self.world_size, criterion=self.criterion,
                               disc_optimizer=self.disc_optimizer, disc_scheduler=self.disc_scheduler)
        prune_checkpoints(self.run_dir, self.cfg.keep_last)
        return path

    # ------------------------------------------------------------------ training
    def fit(self) -> nn.Module:
        """Train to ``cfg.steps`` (resuming if a checkpoint exists); returns the EMA model (eval mode)."""
        cfg = self.cfg
        self._prepare()
        if self.step >= cfg.steps:
            return self.ema
        loader = make_loader(self.dataset, cfg.batch_size, cfg.seed, self.rank, self.world_size,
                             start_batch=self.step * cfg.grad_accum, num_workers=cfg.num_workers,
                             pin_memory=self.device.type == "cuda")
        samples_per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        self.model.train()
        sums: dict[str, Any] = {}
        counts: dict[str, int] = {}
        logger = RunLogger(self.run_dir, cfg.steps, self.start_step, enabled=self.is_main,
                           tensorboard=cfg.tensorboard, progress=self.progress)
        with logger:
            while self.step < cfg.steps:
                lr = self.optimizer.param_groups[0]["lr"]
                loss, logs, grad_norm = self._train_step(loader)
                self.step += 1
                for key, value in {"loss": loss, **logs}.items():  # a key may be absent on some steps
                    value = value.detach().float() if torch.is_tensor(value) else float(value)
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                if grad_norm is not None:
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach().float()
                    counts["grad_norm"] = counts.get("grad_norm", 0) + 1
                logger.advance(self.step)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    values = {k: float(v) / counts[k] for k, v in sums.items()}
                    self._check_finite(values["loss"])
                    values["lr"] = lr
                    values["epoch"] = self.step * samples_per_step / len(self.dataset)
                    logger.scalars(self.step, values)
                    sums, counts = {}, {}
                if self.step % cfg.ckpt_every == 0 or last:
                    self._check_finite(float(loss))
                    self.save_checkpoint()
                    self._log_images(logger)
        return self.ema

    def _train_step(self, loader) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
        """One optimizer step over ``grad_accum`` micro-batches (gradients summed, synced once)."""
        cfg = self.cfg
        accum = cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None and hasattr(self.criterion, "clear_discriminator_batches"):
            self.criterion.clear_discriminator_batches()
        loss_total = torch.zeros((), device=self.device)
        log_totals: dict[str, Any] = {}
        for micro in range(accum):
            batch = move_to_device(next(loader), self.device, non_blocking=self.device.type == "cuda")
            sync = micro == accum - 1
            no_sync = self._ddp.no_sync() if (self._ddp is not None and not sync) else contextlib.nullcontext()
            with no_sync:
                with autocast_context(self.device, cfg.precision):
                    loss, logs = self.loss_fn(self.train_module, batch, self.step)
                if not (torch.is_tensor(loss) and loss.ndim == 0):
                    raise TypeError(f"loss_fn must return a scalar tensor as its first value, got {type(loss).__name__}"
                                    f"{tuple(loss.shape) if torch.is_tensor(loss) else ''}")
                (loss / accum).backward()
            loss_total += loss.detach().float() / accum
            for key, value in (logs or {}).items():
                v = value.detach().float() if torch.is_tensor(value) else float(value)
                log_totals[key] = log_totals.get(key, 0.0) + v / accum
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        ema_update(self.ema, self.model, cfg.ema_decay)
        if self.disc_optimizer is not None:
            log_totals.update(self._discriminator_step())
        return loss_total, log_totals, grad_norm

    def _discriminator_step(self) -> dict[str, Any]:
        """One discriminator step on the micro-batches of the generator step just taken (see the class doc)."""
        crit = self.criterion
        # one remembered (x, recon) pair per micro-batch, normally; every pair weighs the same
        pending = getattr(crit, "pending_discriminator_batches", None)
        accum = pending() if callable(pending) else self.cfg.grad_accum
        self.disc_optimizer.zero_grad(set_to_none=True)
        logs_total: dict[str, Any] = {}
        done = 0
        for _ in range(accum):
            with autocast_context(self.device, self.cfg.precision):
                out = crit.discriminator_loss(self.step)
            if out is None:
                break
            loss, logs = out
            (loss / accum).backward()
            done += 1
            for key, value in (logs or {}).items():
                v = value.detach().float() if torch.is_tensor(value) else float(value)
                logs_total[key] = logs_total.get(key, 0.0) + v / accum
        if hasattr(crit, "clear_discriminator_batches"):
            crit.clear_discriminator_batches()
        if done:  # every process takes the same number of micro-batches, so the collective matches
            if distributed.is_distributed():
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._disc_params]
                flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / self.world_size
                offset = 0
                for p in self._disc_params:
                    n = p.numel()
                    p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
                    offset += n
            self.disc_optimizer.step()
            self.disc_scheduler.step()  # counts discriminator steps: a warm-up starts with the discriminator
        return logs_total

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise ManifoldLabError(f"training diverged: loss is {loss} at step {self.step} of run {self.run_dir}; "
                                   "lower optim.lr, add optim.warmup_steps or use precision=fp32, in a new run dir")

    def _log_images(self, logger: RunLogger) -> None:
        if self.image_fn is None or not self.is_main:
            return
        rng = capture_rng()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast_context(self.device, self.cfg.precision):
                images = self.image_fn(self.model, self.step)
            nrow = None
            if isinstance(images, (tuple, list)):  # (images, images per grid row)
                images, nrow = images
            if images is not None:
                logger.images(self.step, images, tag="images", nrow=nrow)
        finally:
            self.model.train(was_training)
            restore_rng(rng)
