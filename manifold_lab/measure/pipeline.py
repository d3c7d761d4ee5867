"""The ``measure`` pipeline: one streaming pass per data source feeds every metric accumulator.

Data flow (specs/architecture.md): image batch -> tokenizer.encode -> latent (B,C,h,w) ->
accumulators. GSQ, eRank, probes and latent statistics need pooled latents and labels; reconstruction
and rFID need decodes of the first ``recon_images``; LPC decodes perturbed latents of the first
``lpc.num_images``; SSC encodes the segmentation set. Images are never all held in memory: only the
pooled latents (N x C) and the metrics' running sums are kept.

Under ``torchrun`` every process takes a strided shard of each data source; accumulators reduce at
``compute()``; only rank 0 writes results.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from manifold_lab import __version__
from manifold_lab.config import to_dict
from manifold_lab.distributed import all_gather_rows, rank, world_size
from manifold_lab.errors import DataError, ManifoldLabError
from manifold_lab.measure.config import MeasureConfig
from manifold_lab.measure.progress import StageTracker
from manifold_lab.train import resolve_device, seed_everything


@dataclass
class MeasureResult:
    """Numbers (``metrics``, JSON-ready) and the arrays the report's figures are drawn from."""

    metrics: dict[str, Any]
    artifacts: dict[str, Any] = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "manifold-lab": __version__}
    for pkg in ("torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "umap-learn", "lpips",
                "torchmetrics", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _shard(dataset: Dataset, n: int) -> Subset:
    """The first ``n`` items of ``dataset``, strided over processes (rank r takes r, r+W, ...)."""
    n = min(n, len(dataset))
    return Subset(dataset, list(range(rank(), n, world_size())))


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def _check_finite(z: torch.Tensor, what: str) -> None:
    bad = (~torch.isfinite(z)).sum().item()
    if bad:
        raise ManifoldLabError(f"{what} contain {int(bad)} NaN/inf values; the tokenizer or latents file is broken")


# ----------------------------------------------------------------------------------------------
# Tokenizer profile
# ----------------------------------------------------------------------------------------------


def measure_tokenizer(tokenizer, cfg: MeasureConfig, tracker: StageTracker) -> MeasureResult:
    """Full profile of a tokenizer: geometry (SSC, LPC, GSQ, eRank), reconstruction, probes."""
    from manifold_lab.data import build_dataset
    from manifold_lab.encoders.fid_backbones import build_fid_backbone
    from manifold_lab.metrics import ChannelStats, FeatureStats, LPCAccumulator, ReconAccumulator
    from manifold_lab.metrics.perceptual import build_perceptual_distance

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer = tokenizer.to(device).eval() if hasattr(tokenizer, "to") else tokenizer
    image_size = int(tokenizer.image_size)
    C, h, w = tokenizer.latent_shape

    with tracker.stage("load data + networks"):
        dataset = build_dataset(cfg.dataset, split=cfg.split, image_size=image_size)
        if len(dataset) == 0:
            raise DataError(f"dataset '{cfg.dataset}' ({cfg.split}) holds no images")
        distance = build_perceptual_distance(cfg.perceptual, device=device)
        fid_net = build_fid_backbone(cfg.fid_backbone).to(device).eval()

    encode = _no_grad(tokenizer.encode)
    decode = _no_grad(tokenizer.decode)

    # ---- one pass: encode everything, decode the first recon_images --------------------------
    n_total = min(cfg.num_images, len(dataset))
    n_recon = min(cfg.recon_images, n_total)
    shard = _shard(dataset, n_total)
    stats = ChannelStats(C)
    recon = ReconAccumulator()
    fid_real, fid_fake = FeatureStats(fid_net.dim), FeatureStats(fid_net.dim)
    pooled, labels, examples = [], [], None
    seen = 0
    real_cached = _real_fid_features(fid_net, dataset, n_recon, cfg, tracker, device)
    if real_cached is not None:
        fid_real.update(real_cached.double())
    with tracker.stage("encode / decode", total=len(shard)) as st, torch.no_grad():
        for batch in _loader(shard, cfg.batch_size):
            x, y = batch[0].to(device), batch[-1]
            z = encode(x)
            _check_finite(z, "latents")
            stats.update(z)
            pooled.append(z.float().mean(dim=(2, 3)).cpu())
            labels.append(torch.as_tensor(y).cpu())
            # global index of each row in this shard: rank + world * (seen + i)
            gidx = rank() + world_size() * (seen + torch.arange(x.shape[0]))
            keep = gidx < n_recon
            if keep.any():
                xr = x[keep]
                x_rec = decode(z[keep]).clamp(-1, 1)
                recon.update(xr, x_rec, distance(xr, x_rec))
                if real_cached is None:
                    fid_real.update(fid_net(xr).double())
                fid_fake.update(fid_net(x_rec).double())
                if examples is None:
                    examples = (xr[:8].cpu(), x_rec[:8].cpu())
            seen += x.shape[0]
            st.advance(x.shape[0])
    pooled_t = all_gather_rows(torch.cat(pooled)).numpy()
    labels_t = all_gather_rows(torch.cat(labels)).numpy()

    from manifold_lab.metrics import frechet_distance

    recon_res = recon.compute()
    fid_res = frechet_distance(fid_real.mean(), fid_real.cov(), fid_fake.mean(), fid_fake.cov())
    metrics: dict[str, Any] = {
        "reconstruction": {
            **_jsonable(recon_res),
            "rfid": float(fid_res["fid"]),
            "rfid_sqrtm_method": fid_res.get("sqrtm_method"),
            "n_images": n_recon,
            "perceptual_distance": distance.name,
            "fid_backbone": fid_net.name,
        },
        "latent_stats": _jsonable(stats.compute()),
    }
    artifacts: dict[str, Any] = {"recon_examples": examples}

    _semantic_metrics(pooled_t, labels_t, C, cfg, tracker, metrics, artifacts, getattr(dataset, "classes", None))

    # ---- LPC ------------------------------------------------------------------------------------
    lpc_acc = LPCAccumulator(rhos=tuple(cfg.lpc.rhos), seed=cfg.seed, directions=cfg.lpc.directions)
    lpc_shard = _shard(dataset, min(cfg.lpc.num_images, len(dataset)))
    lpc_batch = max(1, min(cfg.batch_size, 64))
    path_values = []
    with tracker.stage("LPC (perturb + decode)", total=len(lpc_shard)) as st, torch.no_grad():
        for batch in _loader(lpc_shard, lpc_batch):
            x = batch[0].to(device)
            z = encode(x)
            lpc_acc.update(z, decode, distance)
            if cfg.lpc.path_pairs > 0 and sum(v.numel() for v in path_values) < cfg.lpc.path_pairs and z.shape[0] >= 2:
                from manifold_lab.metrics import path_lipschitz

                half = z.shape[0] // 2
                path_values.append(path_lipschitz(z[:half], z[half:2 * half], decode, distance,
                                                  steps=cfg.lpc.path_steps).float().cpu())
            st.advance(x.shape[0])
    lpc_res = _jsonable(lpc_acc.compute())
    lpc_res["perceptual_distance"] = distance.name
    if path_values:
        pv = all_gather_rows(torch.cat(path_values))[: cfg.lpc.path_pairs]
        lpc_res["path_lipschitz"] = {"mean": float(pv.mean()), "std": float(pv.std()) if pv.numel() > 1 else 0.0,
                                     "n_pairs": int(pv.numel()), "steps": cfg.lpc.path_steps}
    metrics["lpc"] = lpc_res

    # ---- SSC ------------------------------------------------------------------------------------
    from manifold_lab.tokenizers.base import HasReferenceMaps

    references = _no_grad(tokenizer.reference_maps) if isinstance(tokenizer, HasReferenceMaps) else None
    metrics["ssc"], artifacts["ssc_examples"] = _ssc_stage(encode, image_size, (h, w), cfg, tracker, device,
                                                           references)
    return MeasureResult(metrics=metrics, artifacts=artifacts)


def _real_fid_features(fid_net, dataset, n: int, cfg: MeasureConfig, tracker: StageTracker,
                       device: torch.device) -> torch.Tensor | None:
    """FID-backbone features of the first ``n`` real images, from the feature cache (computed once).

    The reference side of rFID never changes for a (backbone, dataset, n), so it is cached on disk
    (``manifold_lab.encoders.feature_cache``). Under DDP each process computes its own shard instead.
    """
    key = getattr(dataset, "cache_key", None)
    if world_size() > 1 or key is None:
        return None
    from manifold_lab.encoders.feature_cache import cached_features

    with tracker.stage("FID reference features", total=n) as st:
        done = [0]

        def advance(k: int, total: int) -> None:
            st.advance(k - done[0])
            done[0] = k

        out = cached_features(fid_net, fid_net.identity(), Subset(dataset, list(range(n))), f"{key}/first{n}",
                              transform_key="", batch_size=cfg.batch_size, progress=advance, device=device)
    return out["features"].to(device)


def _no_grad(fn: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapped


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _semantic_metrics(pooled: np.ndarray, labels: np.ndarray | None, channels: int, cfg: MeasureConfig,
                      tracker: StageTracker, metrics: dict, artifacts: dict, class_names) -> None:
    """GSQ, eRank and the probes, all on pooled latents (labels optional: GSQ and probes need them)."""
    from manifold_lab.metrics import erank_report, gsq_protocol, knn_accuracy, linear_probe, silhouette, tsne_2d, umap_2d

    with tracker.stage("GSQ + eRank"):
        metrics["erank"] = _jsonable(erank_report(pooled))
        if labels is not None:
            counts = np.bincount(labels.astype(np.int64))
            counts = counts[counts > 0]
            per_class = cfg.gsq.per_class
            if per_class is not None:
                per_class = int(min(per_class, counts.min()))
            metrics["gsq"] = _jsonable(gsq_protocol(pooled, labels, num_classes=cfg.gsq.num_classes,
                                                    per_class=per_class, repeats=cfg.gsq.repeats, seed=cfg.seed))
        else:
            metrics["gsq"] = {"skipped": "no labels"}

    if labels is None:
        metrics["probes"] = {"skipped": "no labels"}
        return
    p = cfg.probes
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(len(pooled), size=min(p.num_points, len(pooled)), replace=False))
    sub, sub_labels = pooled[idx], labels[idx]
    probes: dict[str, Any] = {"num_points": int(len(idx)), "knn_k": p.knn_k}
    maps: dict[str, np.ndarray] = {}
    # small data sets (a user's folder): cap the neighbourhood sizes at what n points allow, and record it
    n = len(idx)
    knn_k = max(1, min(p.knn_k, n - 1))
    perplexity = float(min(p.tsne_perplexity, max(1.0, (n - 1) / 3)))
    n_neighbors = int(max(2, min(p.umap_neighbors, n - 1)))
    probes["knn_k"] = knn_k
    if p.tsne and n >= 4:
        with tracker.stage("t-SNE probe"):
            emb = tsne_2d(sub, seed=cfg.seed, perplexity=perplexity)
            maps["tsne"] = emb
            probes["tsne"] = {"knn_accuracy": float(knn_accuracy(emb, sub_labels, k=knn_k)),
                              "silhouette": float(silhouette(emb, sub_labels)), "perplexity": perplexity}
    if p.umap and n >= 4:
        with tracker.stage("UMAP probe"):
            emb = umap_2d(sub, seed=cfg.seed, n_neighbors=n_neighbors, min_dist=p.umap_min_dist)
            maps["umap"] = emb
            probes["umap"] = {"knn_accuracy": float(knn_accuracy(emb, sub_labels, k=knn_k)),
                              "silhouette": float(silhouette(emb, sub_labels)),
                              "n_neighbors": n_neighbors, "min_dist": p.umap_min_dist}
    if p.linear_probe:
        with tracker.stage("linear probe"):
            probes["linear_probe"] = _jsonable(linear_probe(pooled, labels, seed=cfg.seed))
    metrics["probes"] = probes
    artifacts["maps"] = maps
    artifacts["map_labels"] = sub_labels
    artifacts["class_names"] = list(class_names) if class_names is not None else None


def _ssc_stage(encode: Callable, image_size: int, grid: tuple[int, int], cfg: MeasureConfig,
               tracker: StageTracker, device: torch.device,
               references: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None) -> tuple[dict, dict | None]:
    """SSC on the embedded composed scenes or on a user image folder with mask PNGs.

    ``references`` (a tokenizer's ``reference_maps``) adds the SSC of each map it returns, with the
    segments downsampled to that map's own grid, under ``references``: the same scenes, the same
    clustering, so the latent's SSC can be read against what it is aligned to.
    """
    from manifold_lab.metrics import SSCAccumulator, downsample_segments

    sc = cfg.ssc
    if cfg.masks:
        from manifold_lab.data import ImageFolder

        data = ImageFolder(cfg.dataset, image_size=image_size, masks_root=cfg.masks)
        source = f"{cfg.dataset} with masks {cfg.masks}"
    elif cfg.dataset == "fashion-mnist":
        from manifold_lab.data import FashionScenes

        data = FashionScenes(num_scenes=sc.num_scenes, image_size=image_size, min_items=sc.min_items,
                             max_items=sc.max_items, split=cfg.split, seed=cfg.seed)
        source = getattr(data, "name", "fashion-scenes")
    else:
        return {"skipped": f"dataset '{cfg.dataset}' carries no segmentation; pass --set masks=FOLDER "
                           "(instance/panoptic mask PNGs) to measure SSC"}, None

    acc = SSCAccumulator(sigma=sc.sigma, seed=cfg.seed, n_init=sc.n_init)
    ref_accs: dict[str, SSCAccumulator] = {}
    ref_grids: dict[str, list[int]] = {}
    shard = _shard(data, sc.num_scenes)
    examples = None
    with tracker.stage("SSC (spectral clustering)", total=len(shard)) as st, torch.no_grad():
        for batch in _loader(shard, cfg.batch_size):
            x, mask = batch[0].to(device), batch[1]
            z = encode(x)
            _check_finite(z, "latents")
            seg = downsample_segments(mask.to(z.device), grid)
            acc.update(z, seg)
            for name, fmap in (references(x) if references is not None else {}).items():
                if fmap.dim() != 4 or fmap.shape[0] != x.shape[0]:
                    raise ManifoldLabError(f"reference_maps()['{name}'] must be (B, D, h, w) for {x.shape[0]} "
                                           f"images, got {tuple(fmap.shape)}")
                _check_finite(fmap, f"reference map '{name}'")
                ref_grids[name] = list(fmap.shape[-2:])
                ref_accs.setdefault(name, SSCAccumulator(sigma=sc.sigma, seed=cfg.seed, n_init=sc.n_init)).update(
                    fmap.float(), downsample_segments(mask.to(fmap.device), tuple(fmap.shape[-2:])))
            if examples is None and sc.examples > 0:
                examples = _ssc_examples(z[: sc.examples], seg[: sc.examples], x[: sc.examples], mask[: sc.examples],
                                         sc, cfg.seed)
            st.advance(x.shape[0])
    res = _jsonable(acc.compute())
    res["source"] = source
    res["grid"] = list(grid)
    if ref_accs:
        res["references"] = {}
        for name, a in ref_accs.items():
            r = a.compute()
            res["references"][name] = {"mean": r["mean"], "std": r["std"], "n_images": r["n_images"],
                                       "grid": ref_grids[name]}
    return res, examples


def _ssc_examples(z, seg, x, mask, sc, seed) -> dict:
    """Image | true segments | latent clusters for a few scenes (for the report figure)."""
    from manifold_lab.metrics import ssc_clusters

    clusters, nmi = ssc_clusters(z, seg, sigma=sc.sigma, seed=seed, n_init=sc.n_init)
    return {"images": x.cpu(), "masks": mask.cpu(), "segments": seg.cpu(), "clusters": clusters.cpu(),
            "nmi": nmi.cpu()}


# ----------------------------------------------------------------------------------------------
# Encode-only profile from a latents file
# ----------------------------------------------------------------------------------------------


def load_latents_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors latents file: ``latents`` (N,C,h,w), optional ``labels`` (N) and
    ``segments`` (N,h,w) at latent resolution (or (N,H,W) masks, downsampled by mode vote)."""
    from manifold_lab.io import load_tensors

    data = load_tensors(path)
    if "latents" not in data:
        raise DataError(f"latents file {path} has no 'latents' tensor (found: {', '.join(sorted(data)) or 'nothing'})")
    z = data["latents"]
    if z.ndim != 4:
        raise DataError(f"latents in {path} must be (N,C,h,w), got shape {tuple(z.shape)}")
    if z.shape[0] < 2:
        raise DataError(f"latents file {path} holds {z.shape[0]} latent(s); need at least 2")
    bad = int((~torch.isfinite(z)).sum())
    if bad:
        raise DataError(f"latents file {path} contains {bad} NaN/inf values; fix the latents before measuring")
    for key in ("labels", "segments"):
        if key in data and data[key].shape[0] != z.shape[0]:
            raise DataError(f"{key} in {path} has {data[key].shape[0]} rows but latents have {z.shape[0]}")
    return data


def measure_latents(path: str | Path, cfg: MeasureConfig, tracker: StageTracker) -> MeasureResult:
    """Encode-only profile: SSC (if segments), GSQ + probes (if labels), eRank and statistics."""
    from manifold_lab.metrics import ChannelStats, SSCAccumulator, downsample_segments

    seed_everything(cfg.seed)
    with tracker.stage("load latents"):
        data = load_latents_file(path)
    z = data["latents"].float()
    C, h, w = z.shape[1:]
    stats = ChannelStats(C)
    stats.update(z)
    skipped = "encode-only profile from a latents file: LPC and reconstruction need the tokenizer's decoder"
    metrics: dict[str, Any] = {
        "reconstruction": {"skipped": skipped},
        "lpc": {"skipped": skipped},
        "latent_stats": _jsonable(stats.compute()),
    }
    artifacts: dict[str, Any] = {}
    pooled = z.mean(dim=(2, 3)).numpy()
    labels = data["labels"].long().numpy() if "labels" in data else None
    _semantic_metrics(pooled, labels, C, cfg, tracker, metrics, artifacts, None)
    if "segments" in data:
        seg = data["segments"].long()
        if tuple(seg.shape[1:]) != (h, w):
            seg = downsample_segments(seg, (h, w))
        acc = SSCAccumulator(sigma=cfg.ssc.sigma, seed=cfg.seed, n_init=cfg.ssc.n_init)
        with tracker.stage("SSC (spectral clustering)", total=seg.shape[0]) as st:
            for i in range(0, seg.shape[0], cfg.batch_size):
                acc.update(z[i:i + cfg.batch_size], seg[i:i + cfg.batch_size])
                st.advance(min(cfg.batch_size, seg.shape[0] - i))
        metrics["ssc"] = _jsonable(acc.compute())
        metrics["ssc"]["source"] = f"segments in {path}"
    else:
        metrics["ssc"] = {"skipped": "the latents file has no 'segments' tensor"}
    return MeasureResult(metrics=metrics, artifacts=artifacts)


def run_metadata(cfg: MeasureConfig, subject: dict[str, Any], timings: dict[str, float], started: float) -> dict:
    """What produced a result: config, seed, versions, subject, devices and per-stage wall times."""
    return {
        "subject": subject,
        "config": to_dict(cfg),
        "seed": cfg.seed,
        "versions": package_versions(),
        "device": str(resolve_device(cfg.device)),
        "world_size": world_size(),
        "torch_threads": torch.get_num_threads(),
        "timing_s": {k: round(v, 3) for k, v in timings.items()},
        "wall_time_s": round(time.perf_counter() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def summary_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (one per metric) for tables: SSC, LPC, GSQ, eRank, PSNR, SSIM, rFID."""

    def get(*keys):
        node: Any = metrics
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    return {
        "SSC": get("ssc", "mean"),
        "LPC": get("lpc", "lpc"),
        "GSQ": get("gsq", "mean"),
        "eRank": get("erank", "erank"),
        "eRank/C": get("erank", "erank_normalized"),
        "PSNR": get("reconstruction", "psnr"),
        "SSIM": get("reconstruction", "ssim"),
        "perceptual": get("reconstruction", "perceptual"),
        "rFID": get("reconstruction", "rfid"),
    }
