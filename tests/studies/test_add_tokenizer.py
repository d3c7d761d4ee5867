"""README's "Add your own tokenizer" walkthrough, step by step, with a tokenizer from outside the package.

Why: a third-party tokenizer only knows the public API (``TokenizerBase``, ``TokenizerSpec``), ships
its own recipe and is found through the ``manifold_lab.tokenizers`` entry point. This test writes such a
package (``toytok``: its own config, a new two-layer conv architecture, an L1 loss, a CPU recipe) plus
the dist-info folder that ``pip install`` would write, and then runs the README's commands as
subprocesses of the real CLI with only ``PYTHONPATH`` pointing at it: ``measure`` (which trains the
default checkpoint from the shipped recipe), ``study run`` (toytok next to the baseline VAE through
every stage up to gFID) and ``report``. The code written here is the code README.md shows; the last
check keeps the two identical, so the README is known to work.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_SECTION = "## Add your own tokenizer"

# Step 1: the tokenizer, in one file (README: toytok/__init__.py).
TOYTOK_PY = '''\
"""ToyTok: a two-layer strided-conv autoencoder (32x32 images -> 4x8x8 latents), plugged into manifold-lab."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manifold_lab.tokenizers import TokenizerBase, TokenizerSpec


@dataclass
class ToyTokConfig:
    """The recipe's ``model:`` section; saved in every checkpoint's config.json."""

    image_size: int = 32
    in_channels: int = 3
    width: int = 32
    z_channels: int = 4


class ToyTok(TokenizerBase):
    """Encoder: two stride-2 convs (factor 4). Decoder: two stride-2 transposed convs."""

    name = "toytok"  # the registry name: checkpoints are loaded back through it

    def __init__(self, config: ToyTokConfig) -> None:
        super().__init__(config, config.image_size, config.in_channels, config.z_channels, downsample=4)
        c, w, z = config.in_channels, config.width, config.z_channels
        self.encoder = nn.Sequential(nn.Conv2d(c, w, 4, stride=2, padding=1), nn.SiLU(),
                                     nn.Conv2d(w, z, 4, stride=2, padding=1))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(z, w, 4, stride=2, padding=1), nn.SiLU(),
                                     nn.ConvTranspose2d(w, c, 4, stride=2, padding=1))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) in [-1,1] -> (B,C,H/4,W/4), deterministic
        return self.encoder(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:  # (B,C,h,w) -> (B,3,4h,4w)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # what the loss calls (DDP needs a forward)
        return self.decode(self.encode(x))


def toytok_loss(model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 reconstruction; ``batch`` is (images, labels) from the recipe's dataset."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    l1 = (model(x) - x).abs().mean()
    return l1, {"l1": l1.detach()}


SPEC = TokenizerSpec(
    name="toytok",
    config_cls=ToyTokConfig,
    build=ToyTok,
    loss=toytok_loss,
    default_recipe=Path(__file__).with_name("toytok_cpu.yaml"),  # shipped next to this file
    description="two-layer strided-conv autoencoder (the README example)",
)
'''

# Step 2: what `pip install .` of the README's pyproject.toml writes (the entry point that registers it).
ENTRY_POINTS = '''\
[manifold_lab.tokenizers]
toytok = toytok:SPEC
'''

# Step 3: the CPU recipe of the default checkpoint (README: toytok/toytok_cpu.yaml).
TOYTOK_RECIPE = '''\
# ToyTok's default checkpoint: Fashion-MNIST 32x32 -> 4x8x8 latents, a few seconds on one CPU core.
tokenizer: toytok
model:
  image_size: 32
  in_channels: 3
  width: 32
  z_channels: 4
train:
  steps: 100
  batch_size: 32
  ema_decay: 0.9
  ckpt_every: 100
  log_every: 25
  tensorboard: false
  optim:
    lr: 3.0e-3
    warmup_steps: 10
data:
  name: fashion-mnist
  split: train
  stats_images: 500
  stats_batch_size: 250
'''

# Step 4: measure it (the README's command plus small settings: pilot.yaml's smoke measure_set).
MEASURE_SET = ["num_images=40", "recon_images=20", "batch_size=20", "ssc.num_scenes=4", "ssc.n_init=1",
               "ssc.examples=1", "lpc.num_images=4", "lpc.path_pairs=0", "gsq.per_class=4", "gsq.repeats=1",
               "probes.tsne=false", "probes.umap=false", "probes.linear_probe=false", "probes.num_points=40"]

# Step 5: a study with toytok next to the baseline VAE (README: studies/toytok.yaml); the smoke budget is
# studies/pilot.yaml's, plus the toytok line under tokenizer_set.
STUDY_YAML = '''\
name: toytok
title: "ToyTok next to the baseline VAE"
default_budget: smoke
stages: [tokenizer, measure, cache_latents, train_dit, sample, evaluate]
seeds: [0]
budgets:
  smoke:
    note: Seconds per run; exercises every stage of every run, measures nothing meaningful.
    gfid: smoke
    gfid_set: [data.num_items=48, data.stats_items=48, sample.num_samples=10, eval.ref_max_items=20]
    measure_set: [num_images=40, recon_images=20, batch_size=20, ssc.num_scenes=4, ssc.n_init=1, ssc.examples=1,
                  lpc.num_images=4, lpc.path_pairs=0, gsq.per_class=4, gsq.repeats=1,
                  probes.tsne=false, probes.umap=false, probes.linear_probe=false, probes.num_points=40]
    tokenizer_set:
      toytok: [train.steps=20, train.log_every=5, data.stats_images=64]
      vae: [train.steps=2, train.batch_size=4, train.ckpt_every=2, train.log_every=1, train.tensorboard=false,
            data.stats_images=16, model.base_channels=8, model.norm_groups=4]
variants:
  - {label: ToyTok C=4, tokenizer: toytok, set: [model.z_channels=4]}
  - {label: VAE C=4, tokenizer: vae, set: [model.z_channels=4]}
'''
TOY_LABEL, VAE_LABEL = "ToyTok C=4", "VAE C=4"


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``manifold-lab ARGS`` in a fresh interpreter (``python -m manifold_lab.cli`` is the same entry point)."""
    proc = subprocess.run([sys.executable, "-m", "manifold_lab.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"manifold-lab {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


@pytest.mark.slow
def test_readme_add_your_own_tokenizer_walkthrough(tmp_path: Path) -> None:
    # steps 1-3: the package, its recipe and its installed metadata, in a site folder of their own
    site = tmp_path / "site"
    (site / "toytok").mkdir(parents=True)
    (site / "toytok" / "__init__.py").write_text(TOYTOK_PY)
    (site / "toytok" / "toytok_cpu.yaml").write_text(TOYTOK_RECIPE)
    info = site / "toytok-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toytok\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
           "MANIFOLD_LAB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert "toytok" not in sys.modules  # nothing in this process knows it: discovery happens in the subprocesses

    # step 2's check: the installed entry point puts it in the registry
    listed = _cli(["tokenizers"], tmp_path, env).stdout
    assert "toytok" in listed and "two-layer" in listed, listed  # name and description (rich may wrap it)

    # step 4: measure (trains the default checkpoint from the recipe shipped in the package, once)
    sets = [a for s in MEASURE_SET for a in ("--set", s)]
    _cli(["measure", "--tokenizer", "toytok", *sets, "--out", str(tmp_path / "measure"), "--no-progress"],
         tmp_path, env)
    payload = json.loads((tmp_path / "measure" / "metrics.json").read_text())
    summary = payload["summary"]
    for key in ("SSC", "LPC", "GSQ", "eRank", "PSNR"):
        assert _finite(summary.get(key)), (key, summary)
    assert 1.0 <= summary["eRank"] <= 4.0 + 1e-6  # 4 latent channels
    assert summary["PSNR"] > 12.0, summary  # trained: the untrained network gives about 7 dB
    ckpts = list((cache / "checkpoints").glob("toytok-*/config.json"))
    assert len(ckpts) == 1, ckpts
    saved = json.loads(ckpts[0].read_text())
    assert saved["tokenizer"] == "toytok" and saved["latent_shape"] == [4, 8, 8]
    assert saved["config"] == {"image_size": 32, "in_channels": 3, "width": 32, "z_channels": 4}
    assert "500 train images" in saved["latent_stats"]["how"]  # the recipe's data.stats_images

    # step 5: a study with toytok and the VAE, smoke budget
    study = tmp_path / "studies" / "toytok.yaml"
    study.parent.mkdir()
    study.write_text(STUDY_YAML)
    work, report = tmp_path / "work", tmp_path / "report"
    run = _cli(["study", "run", str(study), "--budget", "smoke", "--work", str(work), "--out", str(report),
                "--no-progress"], tmp_path, env)
    assert "2 run(s) done, 0 failed" in run.stdout + run.stderr
    rows = {r["label"]: r for r in csv.DictReader((report / "results.csv").read_text().splitlines())}
    assert set(rows) == {TOY_LABEL, VAE_LABEL}
    toy = rows[TOY_LABEL]
    assert toy["status"] == "done" and toy["tokenizer"] == "toytok" and toy["latent_shape"] == "4x8x8", toy
    assert toy["error"] == "" and toy["model.z_channels"] == "4"
    assert math.isfinite(float(toy["gFID"])) and float(toy["gFID"]) > 0, toy
    for key in ("SSC", "LPC", "GSQ", "eRank", "PSNR", "rFID"):
        assert math.isfinite(float(toy[key])), (key, toy)
    assert rows[VAE_LABEL]["status"] == "done" and math.isfinite(float(rows[VAE_LABEL]["gFID"]))
    # the study trained its own toytok from the shipped recipe plus the budget's and the variant's overrides
    stage = json.loads((report / "stages" / "toytok-c4-s0" / "tokenizer.json").read_text())
    assert stage["config"]["recipe"] == "toytok_cpu.yaml"
    assert stage["config"]["overrides"] == ["train.steps=20", "train.log_every=5", "data.stats_images=64",
                                            "model.z_channels=4", "train.seed=0"]

    # step 6: the report, redrawn from results.json alone
    (report / "report.md").unlink()
    _cli(["report", str(report)], tmp_path, env)
    text = (report / "report.md").read_text()
    assert TOY_LABEL in text and VAE_LABEL in text

    # the README shows exactly the code that just ran
    readme = (REPO / "README.md").read_text()
    assert README_SECTION in readme, f"README.md has no '{README_SECTION}' section (the walkthrough this test runs)"
    section = readme.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    for name, block in (("toytok/__init__.py", TOYTOK_PY), ("toytok/toytok_cpu.yaml", TOYTOK_RECIPE),
                        ("studies/toytok.yaml", STUDY_YAML), ("entry point", 'toytok = "toytok:SPEC"')):
        assert block.strip() in section, f"README's '{README_SECTION}' no longer shows this test's {name}"
