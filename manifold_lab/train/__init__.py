"""The one training engine: every trainer (tokenizers, LightningDiT, ...) is a model + a loss on it.

Usage::

    from manifold_lab.train import Trainer, TrainConfig, OptimConfig
    cfg = TrainConfig(steps=10_000, batch_size=64, optim=OptimConfig(lr=2e-4, warmup_steps=500))
    ema_model = Trainer(model, loss_fn, dataset, cfg, "runs/vae").fit()

``loss_fn(model, batch, step) -> (loss, logs)`` computes a scalar loss (a mean over the micro-batch)
by calling ``model(...)``; ``logs`` are extra floats to report. What one optimizer step does:

1. ``grad_accum`` micro-batches of ``batch_size`` samples each: forward under
   :func:`autocast_context` (bf16 when ``precision="bf16"``), backward of ``loss / grad_accum`` so the
   gradients really add up to those of one big batch; under DDP the inner micro-batches run in
   ``no_sync`` and the gradients are all-reduced (averaged) once, on the last one.
2. global-norm gradient clipping (``grad_clip``, 0 = off), an AdamW step (weight decay only on
   tensors with >= 2 dims, never on norms and biases), a ``LambdaLR`` step (linear warm-up, then
   cosine to ``min_lr_ratio * lr`` or constant), and an EMA update of parameters and float buffers.

3. when ``loss_fn`` is an ``nn.Module`` holding a discriminator (a tokenizer criterion with the GAN
   on, :mod:`~manifold_lab.train.gan`): one discriminator step with its own AdamW on the micro-batches
   of that step (accumulated like the generator's; gradients all-reduced by hand under DDP).

Data (:mod:`~manifold_lab.train.data`): an endless stream of per-epoch permutations seeded by
``(seed, epoch)``; micro-batch ``k`` is a pure function of ``k``, so a resumed run reads exactly the
samples an uninterrupted one would, and ``W`` processes x ``B`` samples read what one process with
``W * B`` would.

Run dir layout (only rank 0 writes)::

    run_dir/config.json           train config (+ optional run_config); a restart must match it
    run_dir/checkpoints/step_N/   model.safetensors, ema.safetensors, state.pt (atomic folder),
                                  criterion.safetensors when the criterion has state (discriminator)
    run_dir/metrics.jsonl         one line of averaged scalars per log step
    run_dir/tensorboard/          TensorBoard scalars (train/<key>) and image grids
    run_dir/images/               image grids from image_fn, one png per checkpoint

Restarting the same command resumes from the newest checkpoint (weights, EMA, optimizer, schedule,
step and every process's RNG states), and on CPU with deterministic kernels reproduces the
uninterrupted run bit for bit. A finished run returns at once. DDP is used when
``torch.distributed`` is initialised (``torchrun`` sets it up through
:func:`manifold_lab.distributed.init_from_env`, which the trainer calls).
"""

from manifold_lab.train.checkpoint import (capture_rng, latest_checkpoint, load_checkpoint, restore_rng,
                                           save_checkpoint, seed_everything)
from manifold_lab.train.config import OptimConfig, TrainConfig
from manifold_lab.train.data import StreamBatchSampler, move_to_device
from manifold_lab.train.device import autocast_context, resolve_device
from manifold_lab.train.ema import ema_update, make_ema
from manifold_lab.train.engine import Trainer, unwrap_model
from manifold_lab.train.schedule import WarmupDecay, build_optimizer, build_scheduler

__all__ = [
    "Trainer", "TrainConfig", "OptimConfig", "resolve_device", "autocast_context", "unwrap_model",
    "make_ema", "ema_update", "WarmupDecay", "build_optimizer", "build_scheduler", "StreamBatchSampler",
    "move_to_device", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "capture_rng",
    "restore_rng", "seed_everything",
]
