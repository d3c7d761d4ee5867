"""kill -9 in the middle of training, rerun the same command: the result equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from manifold_lab.io import load_tensors
from manifold_lab.train.checkpoint import checkpoint_path, list_checkpoints

SCRIPT = Path(__file__).with_name("train_toy.py")
STEPS = 24  # train_toy.resume_config().steps


def command(run_dir: Path, kind: str = "toy") -> list[str]:
    return [sys.executable, str(SCRIPT), "resume", str(run_dir), "0.05", kind]  # 0.05 s per micro-batch: killable


def run_to_end(run_dir: Path, kind: str = "toy") -> str:
    out = subprocess.run(command(run_dir, kind), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("kind", ["toy", "gan"])
def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path, kind):
    """``gan``: a GAN criterion (discriminator from step 2, noisy inputs): its discriminator, optimizer
    and schedule come back from the checkpoint too."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    reference = subprocess.Popen(command(ref_dir, kind), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(run_dir, kind), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not list_checkpoints(run_dir) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # land somewhere after the first checkpoint (possibly inside a later write)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    steps_done = [s for s, _ in list_checkpoints(run_dir)]
    assert steps_done and max(steps_done) < STEPS, steps_done  # really killed mid-run

    out = run_to_end(run_dir, kind)
    start = int(out.split("start_step=")[1].split()[0])
    assert start == max(steps_done) and 0 < start < STEPS
    ref_out, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err[-2000:]
    assert "start_step=0" in ref_out

    names = ["model.safetensors", "ema.safetensors"] + (["criterion.safetensors"] if kind == "gan" else [])
    for name in names:
        a = load_tensors(checkpoint_path(ref_dir, STEPS) / name)
        b = load_tensors(checkpoint_path(run_dir, STEPS) / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    sa = torch.load(checkpoint_path(ref_dir, STEPS) / "state.pt", weights_only=True)
    sb = torch.load(checkpoint_path(run_dir, STEPS) / "state.pt", weights_only=True)
    for opt in ["optimizer"] + (["disc_optimizer"] if kind == "gan" else []):
        assert sa[opt]["state"]
        for pid, st in sa[opt]["state"].items():
            for key, value in st.items():
                assert torch.equal(value, sb[opt]["state"][pid][key])
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written left
