"""train-dit: the objective's per-sample seeding, DDP equivalence, kill -9 resume, the saved folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from manifold_lab.diffusion.config import load_gfid_recipe
from manifold_lab.diffusion.latent_cache import cache_latents
from manifold_lab.diffusion.train_dit import FlowMatchingObjective, load_dit, sample_seed, train_dit
from manifold_lab.diffusion.transport import TransportConfig
from manifold_lab.errors import CheckpointError
from manifold_lab.io import load_tensors
from manifold_lab.train.checkpoint import list_checkpoints

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_helpers import Toy, tiny_tokenizer  # noqa: E402
from dit_workers import ddp_train  # noqa: E402

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "train.grad_clip=1.0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "c"
    cache_latents(tiny_tokenizer(), Toy(16), folder, batch_size=8, shard_size=8)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_draws_depend_on_the_item_and_step_not_on_the_batch():
    obj = FlowMatchingObjective(TransportConfig(), (4, 8, 8), 10, 0.5, seed=3)
    eps, t, drop = obj.draws(torch.tensor([5, 9, 2]), step=7, device=torch.device("cpu"))
    eps2, t2, drop2 = obj.draws(torch.tensor([9]), step=7, device=torch.device("cpu"))
    assert torch.equal(eps[1], eps2[0]) and torch.equal(t[1], t2[0]) and torch.equal(drop[1], drop2[0])
    eps3, t3, _ = obj.draws(torch.tensor([9]), step=8, device=torch.device("cpu"))
    assert not torch.equal(eps2, eps3) and not torch.equal(t2, t3)
    assert ((t > 0) & (t < 1)).all()
    _, _, drops = obj.draws(torch.arange(2000), step=0, device=torch.device("cpu"))
    assert 0.45 < drops.float().mean() < 0.55  # class dropout at the configured rate
    assert len({sample_seed(0, s, i) for s in range(50) for i in range(200)}) == 10_000


def test_two_gloo_processes_equal_one_process_with_the_combined_batch(cache, tmp_path):
    per_process = TINY + ["train.steps=3", "train.batch_size=4", "train.ckpt_every=3"]
    mp.spawn(ddp_train, args=(2, free_port(), str(cache), str(tmp_path / "ddp"), per_process), nprocs=2, join=True)
    recipe = load_gfid_recipe(budget="smoke", overrides=TINY + ["train.steps=3", "train.batch_size=8",
                                                                  "train.ckpt_every=3"])
    torch.manual_seed(0)
    train_dit(recipe, cache, tmp_path / "single", progress=False)
    a = load_tensors(tmp_path / "ddp" / "dit" / "model.safetensors")
    b = load_tensors(tmp_path / "single" / "dit" / "model.safetensors")
    init = load_tensors(tmp_path / "single" / "checkpoints" / "step_00000003" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)
        moved += int(not torch.equal(a[key], init[key]))
    assert moved > 0
    meta = json.loads((tmp_path / "single" / "dit" / "config.json").read_text())
    assert meta["latent_shape"] == [4, 8, 8] and meta["num_classes"] == 3


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "manifold_lab.cli", *args]


def test_kill_9_then_rerun_continues_the_same_run(cache, tiny_tokenizer_dir, tmp_path):
    steps = 160
    overrides = TINY + [f"train.steps={steps}", "train.ckpt_every=20", "train.keep_last=100", "train.log_every=20"]
    args = ["train-dit", "--checkpoint", str(tiny_tokenizer_dir), "--cache", str(cache), "--budget", "smoke",
            "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = subprocess.Popen(_cli(*args, "--run-dir", str(tmp_path / "ref")), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "run"
    victim = subprocess.Popen(_cli(*args, "--run-dir", str(run_dir)), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list_checkpoints(run_dir)) < 2 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    done = list_checkpoints(run_dir)
    assert done and max(s for s, _ in done) < steps, done  # really killed mid-run
    stamps = {s: p.stat().st_mtime_ns for s, p in done}
    out = subprocess.run(_cli(*args, "--run-dir", str(run_dir)), env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for s, p in list_checkpoints(run_dir):  # the old checkpoints were kept, not rewritten by a fresh start
        if s in stamps:
            assert p.stat().st_mtime_ns == stamps[s]
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    a = load_tensors(tmp_path / "ref" / "dit" / "model.safetensors")
    b = load_tensors(run_dir / "dit" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_load_dit_refuses_a_broken_folder(cache, tmp_path):
    recipe = load_gfid_recipe(budget="smoke", overrides=TINY + ["train.steps=1"])
    _, saved = train_dit(recipe, cache, tmp_path / "r", progress=False)
    model, meta = load_dit(saved)
    assert not model.training and meta["tokenizer"] == "vae"
    with pytest.raises(CheckpointError, match="no trained DiT"):
        load_dit(tmp_path / "nothing")
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model"]["hidden_size"] = 64
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load_dit(saved)


@pytest.mark.parametrize("budget", ["cpu", "smoke", "imagenet256"])
def test_every_budget_loads_and_validates(budget):
    recipe = load_gfid_recipe(budget=budget)
    assert recipe.train.steps >= 1 and recipe.sample.num_samples >= 1
    if budget == "imagenet256":
        assert (recipe.model.size, recipe.train.precision, recipe.sample.num_samples) == ("XL", "bf16", 50000)
        assert recipe.sample.cfg_interval == (0.0, 0.875)
