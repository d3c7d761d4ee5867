"""DDP: two gloo processes with batch 4 each take the same steps as one process with batch 8 (also with a
GAN criterion: adaptive weight and discriminator step)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from manifold_lab.train import OptimConfig, TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from train_toy import ImageData, RegressionData, TinyAE, TinyNet, ddp_worker, gan_criterion, mse_loss  # noqa: E402


def cfg(batch_size: int, grad_accum: int = 1) -> TrainConfig:
    return TrainConfig(steps=3, batch_size=batch_size, grad_accum=grad_accum, grad_clip=0.0, ckpt_every=3,
                       log_every=1, device="cpu", tensorboard=False,
                       optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.01))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
    # two jobs in the same process group: 2 x batch 4, and 2 x (2 micro-batches of 2, no_sync on the first)
    jobs = [(str(tmp_path / "ddp"), str(tmp_path / "ddp.pt"), cfg(4)),
            (str(tmp_path / "ddp_accum"), str(tmp_path / "ddp_accum.pt"), cfg(2, grad_accum=2)),
            (str(tmp_path / "ddp_gan"), str(tmp_path / "ddp_gan.pt"), cfg(4), "gan")]
    mp.spawn(ddp_worker, args=(2, free_port(), jobs), nprocs=2, join=True)

    torch.manual_seed(0)
    start = TinyNet()
    torch.manual_seed(0)
    single = Trainer(TinyNet(), mse_loss, RegressionData(), cfg(8), tmp_path / "single", progress=False)
    single.fit()
    assert not torch.equal(single.model.net[0].weight, start.net[0].weight)
    for _, out_file, _, *kind in jobs:
        if kind:
            continue
        ddp = torch.load(out_file, weights_only=True)
        for key, value in single.model.state_dict().items():
            torch.testing.assert_close(ddp["weights"][key], value, rtol=0, atol=1e-6)
        for key, param in single.model.named_parameters():  # averaged over ranks, not summed
            torch.testing.assert_close(ddp["grads"][key], param.grad, rtol=0, atol=1e-6)
    # only rank 0 wrote the run dir, and its checkpoint records both ranks' RNG states
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    # GAN criterion (adaptive weight on, discriminator from step 1): the adaptive weight's gradients and
    # the discriminator's gradients are averaged over processes, so 2 x 4 equals 1 x 8 here as well
    crit = gan_criterion()
    torch.manual_seed(0)
    single = Trainer(TinyAE(), crit, ImageData(), cfg(8), tmp_path / "single_gan", progress=False)
    single.fit()
    ddp = torch.load(tmp_path / "ddp_gan.pt", weights_only=True)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp["weights"][key], value, rtol=0, atol=1e-6)
    for key, value in crit.state_dict().items():
        torch.testing.assert_close(ddp["disc"][key], value, rtol=0, atol=1e-6)
    for key, param in crit.named_parameters():
        torch.testing.assert_close(ddp["disc_grads"][key], param.grad, rtol=0, atol=1e-6)
    assert not torch.equal(crit.state_dict()["recon.discriminator.main.0.weight"],
                           gan_criterion().state_dict()["recon.discriminator.main.0.weight"])
