"""``manifold-lab gfid``: tokenizer -> latent cache -> LightningDiT -> samples -> gFID, one budget, resumable.

Every stage writes its output atomically and is skipped when that output exists, so a killed chain
rerun with the same command continues where it stopped (the DiT from its last checkpoint, sampling
from its last finished chunk). Folder (default ``runs/gfid/<tokenizer>-<budget>``)::

    recipe.json      the full recipe used (the run refuses to continue with a different one)
    dit-run/         the DiT's training run (checkpoints, TensorBoard)
    dit/             the trained DiT (EMA weights + config)
    samples/         samples.npz (ADM format), grid.png, chunks
    gfid.json        the metrics, the backbone, the reference, and the wall time of every stage
    report.md        the same, readable, with the sample grid

The latent cache is shared between runs: it lives under the package cache
(``$MANIFOLD_LAB_CACHE/latents/``) keyed by the tokenizer's fingerprint and the data settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from manifold_lab import distributed
from manifold_lab.diffusion.config import GFIDRecipe
from manifold_lab.errors import ManifoldLabError
from manifold_lab.io import write_json, write_text

ProgressFactory = Callable[[str], Callable[[int, int], None] | None]


def latent_cache_dir(tokenizer: Any, recipe: GFIDRecipe, image_size: int) -> Path:
    """Where the shared latent cache of this tokenizer + data section lives."""
    from manifold_lab.diffusion.latent_cache import tokenizer_fingerprint
    from manifold_lab.tokenizers.pretrained import cache_root

    d = recipe.data
    key = json.dumps({"name": d.name, "split": d.split, "size": image_size, "n": d.num_items, "flip": d.flip,
                      "shard": d.shard_size, "seed": d.seed}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_root() / "latents" / f"{tokenizer.name}-{tokenizer_fingerprint(tokenizer)}-{digest}"


def build_latent_cache(tokenizer: Any, recipe: GFIDRecipe, out: str | Path | None = None,
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """Encode the recipe's data with ``tokenizer`` (or reuse the finished cache); returns the cache folder."""
    from manifold_lab.data import build_dataset
    from manifold_lab.diffusion.latent_cache import cache_latents

    size = recipe.data.image_size or int(tokenizer.image_size)
    if not tokenizer.supports_resolution(size):
        raise ManifoldLabError(f"tokenizer {tokenizer.name} does not take {size}px images; set data.image_size to a "
                               "size it supports")
    folder = Path(out) if out is not None else latent_cache_dir(tokenizer, recipe, size)
    dataset = build_dataset(recipe.data.name, split=recipe.data.split, image_size=size)
    cache_latents(tokenizer, dataset, folder, num_items=recipe.data.num_items, batch_size=recipe.data.batch_size,
                  shard_size=recipe.data.shard_size, flip=recipe.data.flip, seed=recipe.data.seed,
                  stats_items=recipe.data.stats_items, progress=progress)
    return folder


def class_names_of(recipe: GFIDRecipe) -> list[str] | None:
    if recipe.data.name == "fashion-mnist":
        from manifold_lab.data.fashion_mnist import CLASSES

        return list(CLASSES)
    return None


def run_gfid(tokenizer_name: str, recipe: GFIDRecipe, out_dir: str | Path, *, checkpoint: str | Path | None = None,
             budget_label: str = "", progress: ProgressFactory | None = None,
             train_progress: bool = True) -> dict[str, Any]:
    """Run (or finish) the whole chain and return the gfid.json record."""
    from manifold_lab.diffusion.evaluate import evaluate_samples
    from manifold_lab.diffusion.sample_run import SAMPLES_FILE, sample_dit
    from manifold_lab.diffusion.train_dit import load_dit, train_dit
    from manifold_lab.tokenizers import get_pretrained, load_tokenizer
    from manifold_lab.train.device import resolve_device

    out = Path(out_dir)
    prog = progress or (lambda stage: None)
    _check_recipe(out, recipe, tokenizer_name, checkpoint)
    stages: dict[str, float] = {}
    device = resolve_device(recipe.train.device)

    t = time.perf_counter()
    tok = load_tokenizer(checkpoint) if checkpoint is not None else get_pretrained(tokenizer_name,
                                                                                     progress=train_progress)
    tok = tok.to(device).eval()
    stages["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    cache = build_latent_cache(tok, recipe, progress=prog("cache latents"))
    stages["cache_latents"] = time.perf_counter() - t

    t = time.perf_counter()
    dit_dir = out / "dit"
    if not (dit_dir / "config.json").is_file():
        train_dit(recipe, cache, out / "dit-run", save_dir=dit_dir, tokenizer=tok, progress=train_progress)
    stages["train_dit"] = time.perf_counter() - t

    t = time.perf_counter()
    samples = out / "samples" / SAMPLES_FILE
    if not samples.is_file():
        model, meta = load_dit(dit_dir, device=device)
        sample_dit(model, meta, tok, recipe.sample, out / "samples", dit_dir=dit_dir,
                   class_names=class_names_of(recipe), progress=prog("sample"))
    stages["sample"] = time.perf_counter() - t

    t = time.perf_counter()  # every process extracts a share of the sample features; rank 0 reports
    metrics = evaluate_samples(str(samples), recipe.eval.ref, recipe.eval, split=recipe.eval.ref_split,
                               max_items=recipe.eval.ref_max_items, image_size=int(tok.image_size),
                               progress=prog("evaluate"))
    stages["evaluate"] = time.perf_counter() - t
    record: dict[str, Any] = {}
    if distributed.is_main_process():
        record = {
            "tokenizer": tok.name, "checkpoint": str(checkpoint) if checkpoint else f"default ({tok.name})",
            "budget": budget_label, "gfid": metrics.get("fid"), "metrics": metrics,
            "latent_shape": list(tok.latent_shape), "latent_cache": str(cache),
            "stage_seconds": _merge_times(out, stages), "recipe": recipe.to_dict(),
        }
        write_json(out / "gfid.json", record)
        write_text(out / "report.md", gfid_report(record))
    distributed.barrier()
    return record


def _check_recipe(out: Path, recipe: GFIDRecipe, tokenizer: str, checkpoint: Any) -> None:
    want = {"tokenizer": tokenizer, "checkpoint": str(checkpoint) if checkpoint else None,
            "recipe": json.loads(json.dumps(recipe.to_dict()))}
    path = out / "recipe.json"
    if path.is_file():
        have = json.loads(path.read_text())
        stable = ("data", "model", "transport", "train", "sample")
        diff = [k for k in stable if have.get("recipe", {}).get(k) != want["recipe"].get(k)]
        if have.get("tokenizer") != tokenizer or have.get("checkpoint") != want["checkpoint"]:
            diff.insert(0, "tokenizer")
        if diff:
            raise ManifoldLabError(f"{out} belongs to a gfid run with other settings ({', '.join(diff)} differ); "
                                   "pass another --out folder or delete it")
    if distributed.is_main_process():
        write_json(path, want)  # eval settings may change: evaluation is recomputed every run


def _merge_times(out: Path, stages: dict[str, float]) -> dict[str, float]:
    """This run's stage times, keeping the longer time of a stage an earlier (interrupted) run finished."""
    path = out / "stage_seconds.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = {k: round(max(v, old.get(k, 0.0)), 1) for k, v in stages.items()}
    write_json(path, merged)
    return merged


def gfid_report(record: dict[str, Any]) -> str:
    """A short Markdown report of one gfid run."""
    m = record["metrics"]
    r = record["recipe"]
    s = r["sample"]

    def fmt(v: Any, digits: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    is_text = fmt(m.get("inception_score"), 2)
    if m.get("inception_score") is not None and m.get("inception_score_std") is not None:
        is_text += f" ± {m['inception_score_std']:.2f}"
    lines = [
        f"# gFID of `{record['tokenizer']}` ({record['budget'] or 'custom recipe'})", "",
        "| gFID (↓) | IS (↑) | precision (↑) | recall (↑) | samples | reference | backbone |",
        "|---|---|---|---|---|---|---|",
        f"| {fmt(m.get('fid'), 2)} | {is_text} | {fmt(m.get('precision'))} | {fmt(m.get('recall'))} | "
        f"{m.get('n_samples')} | {m.get('n_reference')} ({m.get('reference')}) | {m.get('backbone')} |", "",
        f"*Table: generation quality of a LightningDiT-{r['model']['size']} ({_dit_shape(r['model'])}) "
        f"trained {r['train']['steps']} steps (batch {r['train']['batch_size']}) on the latents "
        f"({'x'.join(map(str, record['latent_shape']))}) of `{record['tokenizer']}`; {s['num_samples']} "
        f"class-balanced samples, {s['method']} sampler, {s['steps']} steps, CFG scale {s['cfg_scale']} in "
        f"t-interval {list(s['cfg_interval'])} (t = 1 is noise). FID, IS and precision/recall (k = "
        f"{r['eval']['pr_k']}) are computed in the feature space of `{m.get('backbone')}`; numbers from different "
        "backbones or sample counts are not comparable.*", "",
    ]
    if m.get("inception_score_note"):
        lines += [f"IS: {m['inception_score_note']}", ""]
    lines += ["![samples](samples/grid.png)", "",
              "*Figure: samples from the EMA model, one row per class (fixed seeds).*", "",
              "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in record["stage_seconds"].items()]
    lines += ["", "Stages that were already done (loaded from disk) show their load time; see "
              "`dit-run/` for the training log."]
    return "\n".join(lines) + "\n"


def _dit_shape(model: dict[str, Any]) -> str:
    """'depth 4, width 128, patch 1' for a recipe's model section (size defaults resolved)."""
    from manifold_lab.config import from_dict
    from manifold_lab.diffusion.model import DiTConfig

    dims = from_dict(DiTConfig, model, where="model").dims()
    return f"depth {dims.depth}, width {dims.hidden_size}, patch {model['patch_size']}"


__all__ = ["build_latent_cache", "gfid_report", "latent_cache_dir", "run_gfid"]
