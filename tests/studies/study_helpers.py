"""A tiny two-variant study for the engine's tests (a module with a unique name, not a conftest)."""

from __future__ import annotations

from pathlib import Path

import yaml

# the smoke budget of studies/pilot.yaml, shrunk further: every stage runs, in seconds
SMOKE_BUDGET = {
    "note": "test budget",
    "gfid": "smoke",
    "gfid_set": ["data.num_items=32", "data.stats_items=32", "sample.num_samples=10", "eval.ref_max_items=20",
                 "train.steps=3"],
    "measure_set": ["num_images=20", "recon_images=10", "batch_size=10", "ssc.num_scenes=2", "ssc.n_init=1",
                    "ssc.examples=1", "lpc.num_images=2", "lpc.path_pairs=0", "gsq.per_class=2", "gsq.repeats=1",
                    "probes.tsne=false", "probes.umap=false", "probes.linear_probe=false", "probes.num_points=20"],
    "tokenizer_set": {"vae": ["train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1",
                              "train.tensorboard=false", "data.stats_images=8", "model.base_channels=8",
                              "model.norm_groups=4"]},
}


def tiny_study(folder: Path, name: str = "tiny", **extra) -> Path:
    """Write a study with two VAE variants (C=2 and C=4) in one panel; returns the YAML path."""
    data = {
        "name": name, "title": "tiny test study", "default_budget": "smoke",
        "budgets": {"smoke": SMOKE_BUDGET},
        "panels": [{"name": "width", "title": "(a) width", "metric": "rFID", "x_label": "C"}],
        "variants": [
            {"label": "VAE C=2", "tokenizer": "vae", "set": ["model.z_channels=2"], "panels": ["width"], "x": 2},
            {"label": "VAE C=4", "tokenizer": "vae", "set": ["model.z_channels=4"], "panels": ["width"], "x": 4},
        ],
    }
    data.update(extra)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
