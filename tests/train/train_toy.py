"""Tiny model, data and loss shared by the training-engine tests, plus two entry points run in child
processes: ``python train_toy.py resume RUN_DIR [SLEEP] [gan]`` (the kill -9 test) and :func:`ddp_worker`
(DDP test). The GAN toys (a 2-conv image autoencoder + a ReconstructionLoss with a tiny PatchGAN) exercise
the engine's discriminator path."""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from manifold_lab import distributed
from manifold_lab.train import OptimConfig, TrainConfig, Trainer


class RegressionData(Dataset):
    """``n`` samples of ``y = x @ w_true + 0.5``, fixed by ``seed``."""

    def __init__(self, n: int = 40, dim: int = 6, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.w = torch.randn(dim, 2, generator=g)
        self.y = self.x @ self.w + 0.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i]}


class TinyNet(nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mse_loss(model, batch, step):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    return loss, {"mse": loss.detach()}


def noisy_loss(model, batch, step, sleep: float = 0.0):
    """Uses the global RNG (input noise) so a resume is only bit-exact if RNG states are restored."""
    if sleep:
        time.sleep(sleep)
    x = batch["x"] + 0.01 * torch.randn_like(batch["x"])
    loss = ((model(x) - batch["y"]) ** 2).mean()
    return loss, {"mse": float(loss.detach())}


class ImageData(Dataset):
    """``n`` smooth 3x16x16 images in [-1, 1] (upsampled 4x4 noise), fixed by ``seed``."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
        self.x = nn.functional.interpolate(low, size=16, mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], 0


class TinyAE(nn.Module):
    """A 2-conv image autoencoder with a decoder output layer (``last_layer``) for the adaptive weight."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x)))

    def last_layer(self) -> nn.Parameter:
        return self.dec.weight


def gan_criterion(adaptive: bool = True, start_step: int = 1, noise: float = 0.0):
    """A TokenizerCriterion: L1 + hinge PatchGAN (weight 0.5, from ``start_step``) on TinyAE."""
    from manifold_lab.tokenizers.losses import ReconstructionLoss, TokenizerCriterion
    from manifold_lab.train import unwrap_model
    from manifold_lab.train.gan import GANConfig

    class ToyGANCriterion(TokenizerCriterion):
        def forward(self, model, batch, step):
            x = batch[0]
            if noise:  # global RNG use: a resume is only bit-exact if RNG states are restored
                x = x + noise * torch.randn_like(x)
            return self.recon(x, model(x), step, last_layer=unwrap_model(model).last_layer())

    gan = GANConfig(weight=0.5, start_step=start_step, adaptive=adaptive, disc_channels=8, disc_layers=2,
                    lr=1e-2)
    torch.manual_seed(123)  # the same discriminator in every process / run
    return ToyGANCriterion(ReconstructionLoss(l1_weight=1.0, perceptual_weight=0.0, gan=gan))


def resume_config() -> TrainConfig:
    return TrainConfig(steps=24, batch_size=4, grad_accum=2, ckpt_every=4, log_every=4, keep_last=2,
                       ema_decay=0.9, device="cpu", tensorboard=False,
                       optim=OptimConfig(lr=1e-2, warmup_steps=3, weight_decay=0.01))


def resume_main(run_dir: str, sleep: float, kind: str = "toy") -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if kind == "gan":
        crit = gan_criterion(start_step=2, noise=0.01)
        orig_forward = crit.forward

        def slow_forward(model, batch, step):
            time.sleep(sleep)
            return orig_forward(model, batch, step)

        crit.forward = slow_forward  # instance attribute: nn.Module.__call__ still dispatches to it
        torch.manual_seed(0)
        trainer = Trainer(TinyAE(), crit, ImageData(), resume_config(), run_dir, progress=False)
        trainer.fit()
        print(f"start_step={trainer.start_step} step={trainer.step}", flush=True)
        return
    torch.manual_seed(0)
    model = TinyNet(dropout=0.2)
    trainer = Trainer(model, lambda m, b, s: noisy_loss(m, b, s, sleep), RegressionData(), resume_config(),
                      run_dir, progress=False)
    trainer.fit()
    print(f"start_step={trainer.start_step} step={trainer.step}", flush=True)


def ddp_worker(rank: int, world_size: int, port: int, jobs: list[tuple]) -> None:
    """One of ``world_size`` gloo processes: per (run_dir, out_file, cfg[, "gan"]) train; rank 0 saves
    weights and grads (and, for "gan" jobs, the discriminator's weights and grads)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for run_dir, out_file, cfg, *kind in jobs:
        if kind and kind[0] == "gan":
            crit = gan_criterion()
            torch.manual_seed(0)
            trainer = Trainer(TinyAE(), crit, ImageData(), cfg, run_dir, progress=False)
        else:
            crit = None
            torch.manual_seed(0)
            trainer = Trainer(TinyNet(), mse_loss, RegressionData(), cfg, run_dir, progress=False)
        trainer.fit()
        if rank == 0:
            out = {"weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                   "grads": {k: p.grad.clone() for k, p in trainer.model.named_parameters()}}
            if crit is not None:
                out["disc"] = {k: v.clone() for k, v in crit.state_dict().items()}
                out["disc_grads"] = {k: p.grad.clone() for k, p in crit.named_parameters()}
            torch.save(out, out_file)
    distributed.shutdown()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "resume":
        resume_main(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0,
                    sys.argv[4] if len(sys.argv) > 4 else "toy")
    else:
        raise SystemExit("usage: train_toy.py resume RUN_DIR [SLEEP]")
