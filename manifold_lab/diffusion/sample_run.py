"""Draw class-balanced samples from a trained DiT and decode them (``manifold-lab sample``).

Output folder::

    parts/settings.json       what the chunks were made with (a rerun with other settings is refused)
    parts/chunk-00000.npz     one finished chunk of ``sample.batch_size`` samples (atomic)
    samples.npz               ADM format: arr_0 uint8 [N,H,W,3], arr_1 int64 labels (written last)
    samples.json              settings, counts, wall time, network evaluations per sample
    grid.png                  up to 10 samples for each of up to 10 classes (one row per class)

Why chunks: sampling is the longest stage at paper scale (50k samples), so it must survive a kill
and spread over processes. Sample ``i`` always gets label ``balanced_labels(N)[i]`` and noise drawn
from a generator seeded by ``(seed, i)``; chunk ``k`` is done by rank ``k % world_size``. The result
is therefore the same for any number of processes or restarts, bar floating-point batch effects.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from manifold_lab import distributed
from manifold_lab.diffusion.adm_npz import images_to_uint8, write_samples_npz
from manifold_lab.diffusion.config import SampleSection
from manifold_lab.diffusion.latent_cache import tokenizer_fingerprint
from manifold_lab.tokenizers.base import LatentStats
from manifold_lab.diffusion.samplers import balanced_labels, nfe, sample
from manifold_lab.diffusion.train_dit import sample_seed
from manifold_lab.errors import ManifoldLabError
from manifold_lab.io import atomic_path, write_json

SAMPLES_FILE = "samples.npz"


def _settings(cfg: SampleSection, meta: dict[str, Any], dit_dir: str | Path | None) -> dict[str, Any]:
    from manifold_lab.config import to_dict

    weights = Path(dit_dir) / "model.safetensors" if dit_dir is not None else None
    digest = None
    if weights is not None and weights.is_file():
        h = hashlib.sha256()
        with open(weights, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()[:16]
    return {"sampler": to_dict(cfg), "dit_weights": digest, "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"),
            "num_classes": int(meta["num_classes"]), "latent_shape": list(meta["latent_shape"])}


def check_tokenizer(tokenizer: Any, meta: dict[str, Any]) -> None:
    """Refuse to decode a DiT's samples with a tokenizer other than the one whose latents it learned."""
    want = meta.get("tokenizer_fingerprint")
    if want is not None and tokenizer_fingerprint(tokenizer) != want:
        raise ManifoldLabError(f"this DiT was trained on latents of another {meta.get('tokenizer')} checkpoint "
                               f"(fingerprint {want}); decode with that tokenizer (the one cache-latents used)")


@torch.no_grad()
def sample_dit(model: torch.nn.Module, meta: dict[str, Any], tokenizer: Any, cfg: SampleSection,
               out_dir: str | Path, *, dit_dir: str | Path | None = None, class_names: Sequence[str] | None = None,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Sample ``cfg.num_samples`` class-balanced latents, decode them and write the folder described above."""
    out = Path(out_dir)
    check_tokenizer(tokenizer, meta)
    stats = LatentStats(**meta["latent_stats"])
    latent_shape = tuple(int(v) for v in meta["latent_shape"])
    num_classes = int(meta["num_classes"])
    settings = _settings(cfg, meta, dit_dir)
    parts = out / "parts"
    settings_file = parts / "settings.json"
    if distributed.is_main_process():
        if settings_file.is_file():
            old = json.loads(settings_file.read_text())
            if old != json.loads(json.dumps(settings)):
                diff = sorted(k for k in settings if old.get(k) != json.loads(json.dumps(settings))[k])
                raise ManifoldLabError(f"{out} holds samples made with other settings ({', '.join(diff)} differ); "
                                       "pass another --out folder or delete it")
        else:
            parts.mkdir(parents=True, exist_ok=True)
            write_json(settings_file, settings)
    distributed.barrier()
    device = next(model.parameters()).device
    tok_device = next(tokenizer.parameters()).device if hasattr(tokenizer, "parameters") else device
    labels = balanced_labels(cfg.num_samples, num_classes, seed=cfg.seed)
    num_chunks = math.ceil(cfg.num_samples / cfg.batch_size)
    rank, world = distributed.rank(), distributed.world_size()
    done = sum(1 for k in range(num_chunks) if _chunk(parts, k).is_file())
    t0 = time.perf_counter()
    for k in range(num_chunks):
        if k % world != rank or _chunk(parts, k).is_file():
            continue
        lo, hi = k * cfg.batch_size, min(cfg.num_samples, (k + 1) * cfg.batch_size)
        noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(
            sample_seed(cfg.seed, 0, i))) for i in range(lo, hi)]).to(device)
        y = labels[lo:hi].to(device)
        z = sample(model, noise, y, cfg, num_classes=num_classes, latent_shape=latent_shape)
        if not bool(torch.isfinite(z).all()):
            raise ManifoldLabError(f"the DiT produced NaN/inf latents in samples {lo}..{hi - 1}; the model diverged "
                                   "or the sampler settings are broken (try method=euler)")
        images = tokenizer.decode(stats.denormalize(z.float()).to(tok_device)).float().clamp(-1, 1)
        with atomic_path(_chunk(parts, k)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=images_to_uint8(images.cpu()), labels=labels[lo:hi].numpy(),
                         index=np.arange(lo, hi))
        done += 1
        if progress is not None:
            progress(min(done * cfg.batch_size, cfg.num_samples), cfg.num_samples)
    distributed.barrier()
    if distributed.is_main_process():
        chunks = [np.load(_chunk(parts, k)) for k in range(num_chunks)]
        images = np.concatenate([c["images"] for c in chunks])
        all_labels = np.concatenate([c["labels"] for c in chunks]).astype(np.int64)
        write_samples_npz(out / SAMPLES_FILE, images, all_labels)
        sample_grid(images, all_labels, out / "grid.png", class_names=class_names,
                    title=f"{meta.get('tokenizer')} + LightningDiT-{meta['model'].get('size')}: {cfg.method}, "
                          f"{cfg.steps} steps, CFG {cfg.cfg_scale:g}")
        write_json(out / "samples.json", {
            "num_samples": int(len(images)), "image_shape": list(images.shape[1:]), "settings": settings,
            "nfe_per_sample": nfe(cfg, latent_shape), "seconds_this_run": round(time.perf_counter() - t0, 1),
            "processes": world, "tokenizer": meta.get("tokenizer"),
            "labels": "class-balanced: every class num_samples // num_classes times (balanced_labels)",
        })
    distributed.barrier()
    return out / SAMPLES_FILE


def _chunk(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:05d}.npz"


def sample_grid(images: np.ndarray, labels: np.ndarray, path: Path, class_names: Sequence[str] | None = None,
                per_class: int = 10, max_classes: int = 10, title: str = "") -> Path:
    """A grid of ``per_class`` samples for each of the first ``max_classes`` classes, one row per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in np.unique(labels)][:max_classes]
    h, w = images.shape[1:3]
    canvas = np.ones((len(classes) * (h + 2), per_class * (w + 2), 3), dtype=np.uint8) * 255
    for r, c in enumerate(classes):
        rows = images[labels == c][:per_class]
        for j, img in enumerate(rows):
            canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = img
    fig, ax = plt.subplots(figsize=(per_class * 0.6 + 1.6, len(classes) * 0.6 + 0.6))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([r * (h + 2) + h / 2 for r in range(len(classes))])
    ax.set_yticklabels([class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
                        for c in classes], fontsize=7)
    ax.set_xticks([])
    ax.set_xlabel(f"{per_class} samples per class (fixed seeds)", fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


__all__ = ["SAMPLES_FILE", "check_tokenizer", "sample_dit", "sample_grid"]
