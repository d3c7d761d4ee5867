"""The Trainer end to end on tiny models: learning, accumulation, checkpoints, run-dir rules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from manifold_lab.errors import CheckpointError, ConfigError
from manifold_lab.io import load_tensors
from manifold_lab.train import (OptimConfig, TrainConfig, Trainer, latest_checkpoint, load_checkpoint,
                                make_ema, save_checkpoint)
from manifold_lab.train.checkpoint import capture_rng, list_checkpoints

sys.path.insert(0, str(Path(__file__).parent))
from train_toy import ImageData, RegressionData, TinyAE, TinyNet, gan_criterion, mse_loss, noisy_loss  # noqa: E402


def small_cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, log_every=2, ckpt_every=3, device="cpu", tensorboard=False,
                optim=OptimConfig(lr=1e-2, warmup_steps=2))
    base.update(kw)
    return TrainConfig(**base)


def fresh_model(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def dataset_mse(model, data) -> float:
    with torch.no_grad():
        return float(((model(data.x) - data.y) ** 2).mean())


def test_loss_decreases_on_a_regression_problem(tmp_path):
    data = RegressionData(n=64)
    model = fresh_model()
    before = dataset_mse(model, data)
    cfg = small_cfg(steps=150, batch_size=16, log_every=25, ckpt_every=150, ema_decay=0.9, tensorboard=True,
                    optim=OptimConfig(lr=2e-2, warmup_steps=10, weight_decay=1e-4))
    images_seen = []

    def image_fn(m, step):
        images_seen.append((step, m.training))
        return torch.rand(4, 3, 8, 8) * 2 - 1

    ema = Trainer(model, mse_loss, data, cfg, tmp_path, progress=True, image_fn=image_fn).fit()
    assert dataset_mse(model, data) < 0.02 * before
    assert dataset_mse(ema, data) < 0.05 * before
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [25, 50, 75, 100, 125, 150]
    assert rows[-1]["loss"] < 0.05 * rows[0]["loss"] and rows[-1]["lr"] == pytest.approx(2e-3)
    assert {"loss", "mse", "lr", "grad_norm", "epoch"} <= set(rows[0])
    assert images_seen == [(150, False)] and model.training
    assert list((tmp_path / "images").glob("*.png")) and list((tmp_path / "tensorboard").glob("events.*"))


def test_grad_accum_equals_one_big_batch(tmp_path):
    data = RegressionData(n=20)
    runs = {}
    for name, bs, accum in [("big", 8, 1), ("accum", 4, 2), ("accum4", 2, 4)]:
        model = fresh_model()
        cfg = small_cfg(steps=5, batch_size=bs, grad_accum=accum, ema_decay=0.5, grad_clip=0.0)
        trainer = Trainer(model, mse_loss, data, cfg, tmp_path / name, progress=False)
        trainer.fit()
        # the last step's gradients are still in .grad: Adam is nearly scale-invariant, so compare them too
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        runs[name] = (model.state_dict(), trainer.ema.state_dict(), grads)
    for name in ("accum", "accum4"):
        for ref, got in zip(runs["big"], runs[name]):
            for key in ref:
                torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)
    assert not torch.equal(runs["big"][0]["net.0.weight"], fresh_model().net[0].weight)  # it did train


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    data = RegressionData()
    trainer = Trainer(fresh_model(), noisy_loss, data, small_cfg(steps=4, ckpt_every=100), tmp_path / "a",
                      progress=False)
    trainer.fit()
    path = save_checkpoint(tmp_path / "ckpt", step=trainer.step, model=trainer.model, ema=trainer.ema,
                           optimizer=trainer.optimizer, scheduler=trainer.scheduler, rng=[capture_rng()])
    other = Trainer(fresh_model(seed=5), noisy_loss, data, small_cfg(steps=4, ckpt_every=100), tmp_path / "b",
                    progress=False)
    state = load_checkpoint(path, model=other.model, ema=other.ema, optimizer=other.optimizer,
                            scheduler=other.scheduler)
    assert state["step"] == 4
    for a, b in [(trainer.model, other.model), (trainer.ema, other.ema)]:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    sa, sb = trainer.optimizer.state_dict(), other.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid in sa["state"]:
        for key in sa["state"][pid]:
            assert torch.equal(sa["state"][pid][key], sb["state"][pid][key])
    assert trainer.scheduler.state_dict() == other.scheduler.state_dict()
    # the state file holds only plain data: it loads with weights_only=True
    assert torch.load(path / "state.pt", weights_only=True)["rng"][0]["python"]["state"].dtype == torch.int64


def test_rerun_resumes_and_a_finished_run_returns_at_once(tmp_path):
    data = RegressionData()
    cfg = small_cfg(steps=6, ckpt_every=2, keep_last=2)
    ref = Trainer(fresh_model(), noisy_loss, data, cfg, tmp_path / "ref", progress=False)
    ref.fit()
    # the same run in two pieces: train to step 4 only by stopping after the checkpoint of step 4
    calls = []

    def stop_after_4(model, batch, step):
        if step == 4:
            raise KeyboardInterrupt
        calls.append(step)
        return noisy_loss(model, batch, step)

    with pytest.raises(KeyboardInterrupt):
        Trainer(fresh_model(), stop_after_4, data, cfg, tmp_path / "run", progress=False).fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    resumed = Trainer(fresh_model(seed=9), noisy_loss, data, cfg, tmp_path / "run", progress=False)
    resumed.fit()
    assert resumed.start_step == 4
    for key, value in ref.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4, 6]  # keep_last=2

    def must_not_train(*args):
        raise AssertionError("a finished run trained again")

    again = Trainer(fresh_model(seed=3), must_not_train, data, cfg, tmp_path / "run", progress=False)
    ema = again.fit()
    assert again.step == 6 and ema is again.ema
    assert torch.equal(ema.net[0].weight, ref.ema.net[0].weight)


def test_different_config_in_the_same_run_dir_is_refused(tmp_path):
    data = RegressionData()
    Trainer(fresh_model(), mse_loss, data, small_cfg(steps=2), tmp_path, progress=False).fit()
    changed = small_cfg(steps=2, batch_size=8, optim=OptimConfig(lr=1e-3, warmup_steps=2))
    with pytest.raises(ConfigError) as err:
        Trainer(fresh_model(), mse_loss, data, changed, tmp_path, progress=False).fit()
    msg = str(err.value)
    assert "\n" not in msg and "different config" in msg and "train.batch_size" in msg and "train.optim.lr" in msg
    assert "use a new run dir" in msg
    # logging frequency does not change the weights: allowed
    Trainer(fresh_model(), mse_loss, data, small_cfg(steps=2, log_every=1), tmp_path, progress=False).fit()
    Trainer(fresh_model(), mse_loss, data, small_cfg(steps=2), tmp_path / "r", progress=False,
            run_config={"model": {"width": 1}}).fit()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["run"] == {"model": {"width": 1}}
    with pytest.raises(ConfigError, match="run.model.width"):
        Trainer(fresh_model(), mse_loss, data, small_cfg(steps=2), tmp_path / "r", progress=False,
                run_config={"model": {"width": 2}}).fit()


@pytest.mark.parametrize("damage", ["truncate_state", "garbage_weights", "missing_state"])
def test_corrupt_checkpoint_raises_one_line(tmp_path, damage):
    data = RegressionData()
    Trainer(fresh_model(), mse_loss, data, small_cfg(steps=3), tmp_path, progress=False).fit()
    ckpt = latest_checkpoint(tmp_path)
    if damage == "truncate_state":
        raw = (ckpt / "state.pt").read_bytes()
        (ckpt / "state.pt").write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage_weights":
        (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    else:
        (ckpt / "state.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        Trainer(fresh_model(), mse_loss, data, small_cfg(steps=3), tmp_path, progress=False).fit()
    assert "\n" not in str(err.value) and str(ckpt.name) in str(err.value)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    data = RegressionData()
    Trainer(fresh_model(), mse_loss, data, small_cfg(steps=3), tmp_path, progress=False).fit()
    ckpt = latest_checkpoint(tmp_path)
    wider = TinyNet(hidden=32)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(ckpt, model=wider, ema=make_ema(wider))
    assert set(load_tensors(ckpt / "ema.safetensors")) == set(TinyNet().state_dict())


def test_image_fn_does_not_change_the_trajectory_and_bf16_trains(tmp_path):
    data = RegressionData()
    cfg = small_cfg(steps=4, ckpt_every=1)
    plain = Trainer(fresh_model(), noisy_loss, data, cfg, tmp_path / "plain", progress=False)
    plain.fit()
    drawing = Trainer(fresh_model(), noisy_loss, data, cfg, tmp_path / "img", progress=False,
                      image_fn=lambda m, s: torch.randn(2, 3, 4, 4).clamp(-1, 1))  # consumes RNG
    drawing.fit()
    assert torch.equal(plain.model.net[0].weight, drawing.model.net[0].weight)
    bf16 = Trainer(fresh_model(), mse_loss, data, small_cfg(steps=20, precision="bf16"), tmp_path / "bf16",
                   progress=False)
    before = dataset_mse(bf16.model, data)
    bf16.fit()
    assert dataset_mse(bf16.model, data) < before
    assert bf16.model.net[0].weight.dtype == torch.float32  # autocast never changes parameter dtype


# ------------------------------------------------------------------------------------------ GAN criterion
def gan_run(tmp_path, name, bs, accum, adaptive=False, steps=4, **kw):
    crit = gan_criterion(adaptive=adaptive)
    torch.manual_seed(0)
    model = TinyAE()
    cfg = small_cfg(steps=steps, batch_size=bs, grad_accum=accum, ema_decay=0.5, grad_clip=0.0, **kw)
    trainer = Trainer(model, crit, ImageData(), cfg, tmp_path / name, progress=False)
    trainer.fit()
    return trainer, crit


def test_gan_criterion_grad_accum_equals_one_big_batch(tmp_path):
    # adaptive weight off: it is a ratio of per-micro-batch gradient norms, which no accumulation can
    # reproduce; everything else (generator term, discriminator step) must accumulate exactly
    runs = {name: gan_run(tmp_path, name, bs, accum) for name, bs, accum in [("big", 8, 1), ("accum", 4, 2),
                                                                             ("accum4", 2, 4)]}
    big, big_crit = runs["big"]
    start = gan_criterion().state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in big_crit.state_dict().items())  # D trained
    for name in ("accum", "accum4"):
        trainer, crit = runs[name]
        for ref, got in [(big.model, trainer.model), (big.ema, trainer.ema), (big_crit, crit)]:
            for key, value in ref.state_dict().items():
                torch.testing.assert_close(got.state_dict()[key], value, rtol=0, atol=1e-6)
        for (_, p), (_, q) in zip(big_crit.named_parameters(), crit.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6)
    rows = [json.loads(ln) for ln in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    assert "gan_d" not in rows[0] or rows[0]["step"] > 1
    assert {"gan_d", "logits_real", "logits_fake", "gan_g", "gan_adaptive"} <= set(rows[-1])


def test_gan_checkpoint_holds_the_discriminator_and_its_optimizer(tmp_path):
    trainer, crit = gan_run(tmp_path, "run", 4, 1, adaptive=True, steps=3)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert set(load_tensors(ckpt / "criterion.safetensors")) == set(crit.state_dict())
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["disc_optimizer"]["state"] and "disc_scheduler" in state
    # a second trainer restores discriminator and optimizer exactly
    other_crit = gan_criterion(adaptive=True)
    for p in other_crit.parameters():
        p.data.add_(1.0)
    other = Trainer(TinyAE(), other_crit, ImageData(), trainer.cfg, tmp_path / "other", progress=False)
    other.load_checkpoint(ckpt)
    for key, value in crit.state_dict().items():
        assert torch.equal(other_crit.state_dict()[key], value)
    sa, sb = trainer.disc_optimizer.state_dict(), other.disc_optimizer.state_dict()
    for pid in sa["state"]:
        for key in sa["state"][pid]:
            assert torch.equal(sa["state"][pid][key], sb["state"][pid][key])
    # a GAN-free run's checkpoint cannot silently resume a GAN run
    Trainer(fresh_model(), mse_loss, RegressionData(), small_cfg(steps=1), tmp_path / "plain", progress=False).fit()
    with pytest.raises(CheckpointError, match="criterion"):
        load_checkpoint(latest_checkpoint(tmp_path / "plain"), model=fresh_model(), criterion=gan_criterion())


def test_image_grid_rows_can_be_fixed(tmp_path):
    from PIL import Image

    from manifold_lab.train.run_log import RunLogger

    with RunLogger(tmp_path, 1, 0, tensorboard=False, progress=False) as logger:
        # 4 originals then their 4 reconstructions: nrow=4 puts originals on the top row
        logger.images(1, torch.zeros(8, 3, 8, 8), nrow=4)
        logger.images(2, torch.zeros(8, 3, 8, 8))
    assert Image.open(tmp_path / "images" / "images_00000001.png").size == (4 * 10 + 2, 2 * 10 + 2)
    assert Image.open(tmp_path / "images" / "images_00000002.png").size == (3 * 10 + 2, 3 * 10 + 2)
