"""Pieces of the training engine checked against hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from manifold_lab.config import from_dict
from manifold_lab.errors import ConfigError, DataError
from manifold_lab.train import (OptimConfig, StreamBatchSampler, TrainConfig, WarmupDecay, autocast_context,
                                build_optimizer, build_scheduler, ema_update, make_ema, resolve_device)


# ------------------------------------------------------------------------------------------ schedule
def test_warmup_then_cosine_to_min_ratio():
    f = WarmupDecay(total_steps=15, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 10 decay steps 4..14
    assert f(4 + 10 / 3) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert f(14) == pytest.approx(0.1)  # last step at the floor
    assert f(100) == pytest.approx(0.1)  # stays there
    values = [f(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_constant_schedule_and_lambda_lr_drives_the_optimizer():
    assert [WarmupDecay(10, 2, "constant")(s) for s in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    p = nn.Parameter(torch.zeros(3, 3))
    cfg = OptimConfig(lr=0.1, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0)
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=5)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up 0.05, 0.1, then cosine over steps 2..4: 1, 0.5, 0 times lr
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.05, 0.0], abs=1e-12)


def test_adamw_skips_decay_on_1d_and_frozen_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05, betas=(0.8, 0.95)))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                    id(model[2].bias)}
    assert decay["betas"] == (0.8, 0.95)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), OptimConfig())


# ------------------------------------------------------------------------------------------ EMA
def test_ema_follows_the_closed_form_on_a_known_sequence():
    model = nn.BatchNorm1d(2)
    ema = make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    d = 0.9
    values = [1.0, 2.0, 4.0, -1.0]
    expected = 1.0  # BatchNorm weight starts at 1
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
            model.running_mean.fill_(2 * v)
        model.num_batches_tracked.fill_(int(10 * v) if v > 0 else 7)
        ema_update(ema, model, d)
        expected = d * expected + (1 - d) * v
    # closed form: d^n * w0 + (1 - d) * sum_k d^(n-1-k) v_k
    closed = d ** 4 * 1.0 + (1 - d) * sum(d ** (3 - k) * v for k, v in enumerate(values))
    assert expected == pytest.approx(closed)
    assert torch.allclose(ema.weight, torch.full((2,), closed), atol=1e-6)
    mean_closed = (1 - d) * sum(d ** (3 - k) * 2 * v for k, v in enumerate(values))  # running_mean starts at 0
    assert torch.allclose(ema.running_mean, torch.full((2,), mean_closed), atol=1e-6)
    assert int(ema.num_batches_tracked) == 7  # integer buffers are copied, not averaged
    assert torch.equal(ema.bias, torch.zeros(2))


def test_ema_averages_tied_weights_once():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight
    ema = make_ema(model)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        ema[0].weight.fill_(0.0)
    ema_update(ema, model, 0.5)
    assert torch.allclose(ema[0].weight, torch.full((2, 2), 0.5)) and ema[1].weight is ema[0].weight


# ------------------------------------------------------------------------------------------ device / precision / config
def test_resolve_device_and_autocast():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("floppy")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32


def test_config_validation_and_yaml_shape():
    cfg = from_dict(TrainConfig, {"steps": 10, "optim": {"lr": 1e-3, "betas": [0.5, 0.9]}})
    assert cfg.optim.betas == (0.5, 0.9) and cfg.steps == 10 and cfg.keep_last == 1
    for bad, match in [({"precision": "fp16"}, "precision"), ({"grad_accum": 0}, "grad_accum"),
                       ({"optim": {"schedule": "linear"}}, "schedule"), ({"ema_decay": 1.5}, "ema_decay"),
                       ({"optim": {"min_lr_ratio": 2}}, "min_lr_ratio"), ({"stepz": 3}, "unknown config key")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(TrainConfig, bad)


# ------------------------------------------------------------------------------------------ data stream
def test_stream_is_a_pure_function_of_the_batch_and_covers_each_epoch():
    s = StreamBatchSampler(dataset_len=10, batch_size=4, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(10)]  # 40 positions = 4 epochs, batches straddle epoch ends
    flat = [i for b in first for i in b]
    for epoch in range(4):
        assert sorted(flat[10 * epoch:10 * epoch + 10]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new shuffle each epoch
    resumed = iter(StreamBatchSampler(10, 4, seed=3, start_batch=7))
    assert [next(resumed) for _ in range(3)] == first[7:]
    assert StreamBatchSampler(10, 10, seed=4).batch_indices(0) != flat[:10]  # another seed, another order


def test_ranks_and_micro_batches_split_the_same_global_batch():
    one = StreamBatchSampler(13, batch_size=8, seed=1)
    ranks = [StreamBatchSampler(13, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    micro = StreamBatchSampler(13, batch_size=4, seed=1)
    for k in range(6):
        assert ranks[0].batch_indices(k) + ranks[1].batch_indices(k) == one.batch_indices(k)
        assert micro.batch_indices(2 * k) + micro.batch_indices(2 * k + 1) == one.batch_indices(k)
    with pytest.raises(DataError, match="empty"):
        StreamBatchSampler(0, 4)
