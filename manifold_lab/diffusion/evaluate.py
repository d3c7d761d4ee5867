"""gFID and its companions (precision, recall, Inception Score) of generated samples against a reference.

What a number is compared with (``ref``), in the forms the literature and this package produce:

* an ADM reference batch ``.npz`` (``VIRTUAL_imagenet256_labeled.npz``): its ``mu``/``sigma`` are
  TF-Inception pool3 statistics of the whole reference set and are used *as they are* (as ADM's
  evaluator, LightningDiT and RAE do), so only ``backbone="inception"`` may be compared with them;
  its ``arr_0`` images (10k for ImageNet) give the reference features of precision / recall;
* an ``.npz`` of images only (``arr_0``, e.g. samples of another model): features computed here;
* a registered dataset name or an image folder (``build_dataset``): features of a seeded random
  subset (``max_items``) at the samples' resolution;
* a ``.safetensors`` statistics file written by :func:`save_reference` (mu, sigma, n, optionally
  the features, and the backbone's name and weights identity: a file made with another backbone
  is refused, since numbers of different feature networks are different metrics).

Image references go through :func:`~manifold_lab.encoders.feature_cache.cached_features`, so the
features of a reference are computed once per (backbone weights, data); the next evaluation only
computes the samples'. Samples are read batch by batch from a memory-mapped ADM ``.npz``
(:mod:`manifold_lab.diffusion.adm_npz`) and converted to float on the device; in-memory float
samples are quantised to 8 bits first, so a file and the array it was written from score the same.

Our choices beside the references: the Gaussian of a full feature matrix is computed locally in
float64 with the unbiased covariance (as ``FeatureStats`` and ADM's ``np.cov``), because under
``torchrun`` the metrics run on rank 0 alone while ``FeatureStats`` reduces over processes; FID
itself is :func:`~manifold_lab.metrics.fid.frechet_distance`. Precision / recall use at most
``pr_max`` points of each side (a seeded subset; ADM uses 10k reference images and all samples).
The Inception Score needs a classifier head: the TF-FID Inception file has none, so it is None
(with a note) there, and with MobileNetV2 it is an ImageNet-MobileNetV2 score, not comparable
to published IS values.

Under ``torchrun`` every process calls :func:`evaluate_samples`: each extracts the features of a
contiguous block of samples, the features are gathered, and rank 0 computes the reference and the
metrics; other ranks return a short dict saying so (``shard=False`` for a caller that runs it on
rank 0 alone).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from manifold_lab import distributed
from manifold_lab.diffusion.adm_npz import (_as_rgb_nhwc, images_to_uint8, npz_keys, read_reference_npz,
                                            read_samples_npz, uint8_to_images)
from manifold_lab.errors import CheckpointError, ConfigError, DataError, ManifoldLabError
from manifold_lab.metrics.fid import frechet_distance
from manifold_lab.metrics.generation import inception_score, precision_recall

if TYPE_CHECKING:
    from manifold_lab.encoders.fid_backbones import FIDBackbone

BACKBONES = ("auto", "inception", "mobilenet_v2")
INCEPTION_PREFIX = "inception-v3-tf-fid"  # InceptionFID.name starts with this
STATS_FORMAT = "manifold-lab-fid-reference"

#: progress(done, total): images through the backbone so far / in all (see evaluate_samples)
Progress = Callable[[int, int], None]


@dataclass
class EvalConfig:
    """How samples are scored (the reference itself is an argument of :func:`evaluate_samples`)."""

    backbone: str = "auto"  # "auto" (the reference's backbone, else inception if installed, else mobilenet_v2)
    batch_size: int = 100  # images per feature batch
    pr_k: int = 3  # neighbourhood size of precision / recall
    pr_max: int = 10000  # points of each side used for precision / recall (seeded subset); 0 skips them
    is_splits: int = 10  # splits of the Inception Score
    device: str = "auto"
    seed: int = 0  # subsets (precision / recall points, a dataset reference's max_items)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"eval.backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.pr_k < 1:
            raise ConfigError(f"eval.pr_k must be >= 1, got {self.pr_k}")
        if self.pr_max != 0 and self.pr_max <= self.pr_k:
            raise ConfigError(f"eval.pr_max must be 0 (skip precision/recall) or > pr_k={self.pr_k}, got {self.pr_max}")
        if self.is_splits < 1:
            raise ConfigError(f"eval.is_splits must be >= 1, got {self.is_splits}")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"eval.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class Reference:
    """Gaussian statistics of a reference set in one backbone's feature space (+ features for P/R)."""

    mu: np.ndarray  # (F,) float64
    sigma: np.ndarray  # (F, F) float64
    backbone: str  # FIDBackbone.name
    description: str
    n: int | None = None  # images behind mu/sigma (None: unknown, e.g. an ADM reference batch)
    features: torch.Tensor | None = None  # (M, F) float32 on the CPU, for precision / recall
    backbone_identity: str | None = None  # FIDBackbone.identity(): name + weights hash

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


# ------------------------------------------------------------------------------------------------
# backbone
# ------------------------------------------------------------------------------------------------


def inception_available() -> bool:
    """Whether the TF-FID Inception file is installed (found without loading it)."""
    from manifold_lab.encoders.weights import INCEPTION_FID_FILE, INCEPTION_FID_PACKAGE, packaged_file
    from manifold_lab.errors import MissingWeightsError

    try:
        packaged_file(INCEPTION_FID_PACKAGE, INCEPTION_FID_FILE, "TF-FID Inception-v3", "")
    except MissingWeightsError:
        return False
    return True


def _kind_of_name(name: str) -> tuple[str, dict[str, Any]]:
    """The registry name and options of a backbone from its ``.name`` (e.g. mobilenet_v2-imagenet@96)."""
    if name.startswith(INCEPTION_PREFIX):
        return "inception", {}
    if name.startswith("mobilenet_v2"):
        size = name.rsplit("@", 1)[-1]
        return "mobilenet_v2", ({"input_size": int(size)} if size.isdigit() else {})
    raise ManifoldLabError(f"the reference was made with an unknown FID backbone {name!r}; "
                           "recompute it with backbone=inception or mobilenet_v2")


def build_backbone(name: str = "auto", device: torch.device | str | None = None,
                   reference_backbone: str | None = None) -> FIDBackbone:
    """A frozen FID backbone: ``name`` = inception | mobilenet_v2 | auto (see :class:`EvalConfig`)."""
    from manifold_lab.encoders.fid_backbones import build_fid_backbone

    kw: dict[str, Any] = {}
    if name == "auto":
        if reference_backbone is not None:
            name, kw = _kind_of_name(reference_backbone)
        else:
            name = "inception" if inception_available() else "mobilenet_v2"
    if name not in BACKBONES[1:]:
        raise ConfigError(f"FID backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    return build_fid_backbone(name, **kw).to(device if device is not None else "cpu").eval()


def _resolve_device(device: torch.device | str | None) -> torch.device:
    from manifold_lab.train.device import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(device or "auto")


def _net_device(net) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_backbone(backbone: FIDBackbone | str, device: torch.device | str | None) -> FIDBackbone:
    if isinstance(backbone, str):
        return build_backbone(backbone, _resolve_device(device))
    if device is not None:
        backbone = backbone.to(_resolve_device(device))
    return backbone


def _require_inception(name: str, where: str) -> None:
    """ADM's mu/sigma are TF-Inception pool3 statistics: refuse any other backbone (name or registry name)."""
    if name != "auto" and name != "inception" and not name.startswith(INCEPTION_PREFIX):
        raise ManifoldLabError(f"{where} holds mu/sigma, which are TF-Inception pool3 statistics: they can only be "
                               f"compared with backbone=inception, not {name}; use inception or a reference of images")


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------


def gaussian(features: torch.Tensor, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) in float64 of a feature matrix (N, F), N >= 2, without collectives."""
    n = int(features.shape[0])
    if n < 2:
        raise ManifoldLabError(f"FID needs at least 2 images on each side, got {n}")
    if not bool(torch.isfinite(features).all()):
        raise ManifoldLabError("the FID backbone returned NaN/inf features; the images or the backbone are broken")
    mu = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for i in range(0, n, chunk):
        mu += features[i:i + chunk].to(torch.float64).sum(dim=0)
    mu /= n
    cov = torch.zeros((features.shape[1],) * 2, dtype=torch.float64, device=features.device)
    for i in range(0, n, chunk):
        c = features[i:i + chunk].to(torch.float64) - mu
        cov += c.T @ c
    cov /= n - 1
    cov = (cov + cov.T) / 2
    return mu.cpu().numpy(), cov.cpu().numpy()


class _Uint8Images(Dataset):
    """Items of a uint8 NHWC array (memory map) as uint8 HWC tensors; converted per batch by the caller."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i]))


def _npz_image_features(path: Path, images: np.ndarray, net, batch_size: int, progress: Progress | None,
                        cache_dir: str | os.PathLike | None) -> torch.Tensor:
    """Backbone features of an npz's images, cached under the file's path, size and modification time."""
    from manifold_lab.encoders.feature_cache import cached_features

    if images.shape[0] == 0:
        raise DataError(f"{path} holds no images (arr_0 is empty)")
    dev = _net_device(net)
    stat = path.stat()
    key = f"npz:{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|arr_0"
    out = cached_features(lambda u8: net(uint8_to_images(u8, dev)), net.identity(), _Uint8Images(images), key,
                          transform_key="uint8-nhwc", batch_size=batch_size, cache_dir=cache_dir,
                          progress=progress, device=dev)
    return out["features"].float()


def subset_indices(n: int, max_items: int | None, seed: int = 0) -> np.ndarray:
    """All of ``range(n)``, or a seeded random subset of ``max_items`` of them (sorted)."""
    if max_items is None or max_items >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_items), replace=False))


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------


def reference_stats(ref: str | os.PathLike, backbone: FIDBackbone | str = "auto", *, split: str = "train",
                    image_size: int | None = None, max_items: int | None = None, batch_size: int = 100,
                    device: torch.device | str | None = None, with_features: bool = True, seed: int = 0,
                    progress: Progress | None = None, cache_dir: str | os.PathLike | None = None) -> Reference:
    """The reference statistics of ``ref`` (see the module docstring) in ``backbone``'s feature space.

    ``backbone`` is an FID backbone or its name. ``split`` / ``image_size`` / ``max_items`` apply
    to a dataset reference (``image_size`` is required there: the samples' resolution).
    ``with_features=False`` skips the images of an ADM reference batch (no precision / recall).
    """
    src = os.fspath(ref)
    path = Path(src).expanduser()
    if max_items is not None and max_items < 2:
        raise ConfigError(f"max_items must be >= 2 or None, got {max_items}")
    if path.suffix == ".safetensors":
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, _resolve_device(device), reference_backbone=_stats_backbone(path))
        return load_reference(path, backbone)
    net = _as_backbone(backbone, device)
    if path.suffix == ".npz":
        parts = read_reference_npz(path)
        if "mu" in parts:
            _require_inception(net.name, str(path))
            if parts["mu"].shape[0] != net.dim:
                raise ManifoldLabError(f"{path}: mu has {parts['mu'].shape[0]} entries but {net.name} features have "
                                       f"{net.dim}; this is not a pool3 reference")
            feats = None
            if with_features and "arr_0" in parts:
                feats = _npz_image_features(path, parts["arr_0"], net, batch_size, progress, cache_dir)
            extra = f"; {feats.shape[0]} of its images for precision/recall" if feats is not None else ""
            return Reference(parts["mu"], parts["sigma"], net.name, f"ADM reference {path} (mu/sigma as stored{extra})",
                             n=None, features=feats, backbone_identity=net.identity())
        feats = _npz_image_features(path, parts["arr_0"], net, batch_size, progress, cache_dir)
        mu, sigma = gaussian(feats)
        return Reference(mu, sigma, net.name, f"images of {path} ({feats.shape[0]})", n=int(feats.shape[0]),
                         features=feats, backbone_identity=net.identity())
    return _dataset_reference(src, net, split, image_size, max_items, batch_size, seed, progress, cache_dir)


def _dataset_reference(name: str, net, split: str, image_size: int | None, max_items: int | None, batch_size: int,
                       seed: int, progress: Progress | None, cache_dir: str | os.PathLike | None) -> Reference:
    from manifold_lab.data import build_dataset
    from manifold_lab.encoders.feature_cache import cached_features

    if image_size is None:
        raise ConfigError(f"a dataset reference ({name}) needs image_size: the resolution of the samples it is "
                          "compared with")
    dataset = build_dataset(name, split=split, image_size=int(image_size))
    n_all = len(dataset)
    if n_all < 2:
        raise DataError(f"reference dataset {name} ({split}) holds {n_all} images; FID needs at least 2")
    idx = subset_indices(n_all, max_items, seed)
    sub = dataset if len(idx) == n_all else Subset(dataset, idx.tolist())
    key = getattr(dataset, "cache_key", None)
    dev = _net_device(net)
    if key is not None:
        dkey = key if len(idx) == n_all else f"{key}/random{len(idx)}-seed{seed}"
        feats = cached_features(net, net.identity(), sub, dkey, transform_key="", batch_size=batch_size,
                                cache_dir=cache_dir, progress=progress, device=dev)["features"]
    else:  # a dataset without a content key cannot be cached safely
        feats = _loader_features(sub, net, batch_size, progress)
    feats = feats.float()
    mu, sigma = gaussian(feats)
    return Reference(mu, sigma, net.name, f"dataset {name} ({split}, {len(idx)} of {n_all} images at {image_size}px)",
                     n=int(feats.shape[0]), features=feats, backbone_identity=net.identity())


def _loader_features(dataset: Dataset, net, batch_size: int,
                     progress: Callable[[int, int], None] | None) -> torch.Tensor:
    from torch.utils.data import DataLoader

    dev = _net_device(net)
    out, done = [], 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            out.append(net(x.to(dev)).float().cpu())
            done += x.shape[0]
            if progress is not None:
                progress(done, len(dataset))
    return torch.cat(out)


def save_reference(path: str | os.PathLike, ref: Reference, include_features: bool = True) -> Path:
    """Write ``ref`` as safetensors (mu, sigma, n, features) with its backbone in the metadata (atomic)."""
    from manifold_lab.io import save_tensors

    tensors = {"mu": torch.from_numpy(np.asarray(ref.mu, dtype=np.float64)),
               "sigma": torch.from_numpy(np.asarray(ref.sigma, dtype=np.float64))}
    if ref.n is not None:
        tensors["n"] = torch.tensor(int(ref.n), dtype=torch.int64)
    if include_features and ref.features is not None:
        tensors["features"] = ref.features.detach().float().cpu()
    meta = {"format": STATS_FORMAT, "backbone": ref.backbone, "backbone_identity": ref.backbone_identity or "",
            "description": ref.description[:2000]}
    save_tensors(path, tensors, metadata=meta)
    return Path(path)


def _stats_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"reference stats file not found: {path}; check the path")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for foreign/truncated files
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}); "
                              "re-create it with save_reference") from exc
    if meta.get("format") != STATS_FORMAT or not meta.get("backbone"):
        raise CheckpointError(f"{path} is not a reference stats file written by save_reference "
                              f"(format {meta.get('format')!r}); re-create it")
    return meta


def _stats_backbone(path: Path) -> str:
    return _stats_metadata(path)["backbone"]


def load_reference(path: str | os.PathLike, backbone: FIDBackbone | str | None = None) -> Reference:
    """Read a :func:`save_reference` file; refused when ``backbone`` (name or network) is not the one that made it."""
    from manifold_lab.io import load_tensors

    path = Path(path)
    meta = _stats_metadata(path)
    if backbone is not None:
        _check_same_backbone(meta["backbone"], meta.get("backbone_identity") or None, backbone, str(path))
    t = load_tensors(path)
    if "mu" not in t or "sigma" not in t:
        raise CheckpointError(f"{path} lacks mu/sigma; re-create it with save_reference")
    mu, sigma = t["mu"].double().numpy(), t["sigma"].double().numpy()
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise CheckpointError(f"{path}: mu {mu.shape} / sigma {sigma.shape} do not fit; re-create the file")
    return Reference(mu, sigma, meta["backbone"], f"stats file {path}: {meta.get('description', '')}",
                     n=int(t["n"]) if "n" in t else None, features=t["features"].float() if "features" in t else None,
                     backbone_identity=meta.get("backbone_identity") or None)


def _check_same_backbone(ref_name: str, ref_identity: str | None, backbone: FIDBackbone | str, where: str) -> None:
    name = backbone if isinstance(backbone, str) else backbone.name
    if isinstance(backbone, str) and backbone in BACKBONES:  # a registry name: compare the family only
        family = ("inception" if ref_name.startswith(INCEPTION_PREFIX)
                  else "mobilenet_v2" if ref_name.startswith("mobilenet_v2") else ref_name)
        if backbone != "auto" and family != backbone:
            raise ManifoldLabError(f"{where} was made with FID backbone {ref_name}, not {backbone}; evaluate with "
                                   f"that backbone or recompute the reference with {backbone}")
        return
    if ref_name != name:
        raise ManifoldLabError(f"{where} was made with FID backbone {ref_name}, but this evaluation uses {name}; "
                               f"evaluate with that backbone or recompute the reference with {name}")
    if ref_identity and not isinstance(backbone, str):
        mine = backbone.identity()
        if mine != ref_identity:
            raise ManifoldLabError(f"{where} was made with other weights of {ref_name} ({ref_identity.split('|')[-1]} "
                                   f"vs {mine.split('|')[-1]}); recompute the reference with these weights")


# ------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------


class _Samples:
    """Samples as uint8 NHWC (memory-mapped file or array) or float NCHW in [-1, 1]; batches on demand."""

    def __init__(self, samples: Any) -> None:
        self.float_images: torch.Tensor | None = None
        self.uint8: np.ndarray | torch.Tensor | None = None
        if isinstance(samples, (str, os.PathLike)):
            path = Path(samples).expanduser()
            if not path.is_file():
                raise ManifoldLabError(f"samples file not found: {path}; pass the samples.npz that `sample` wrote")
            self.uint8, _ = read_samples_npz(path)
            self.description = str(path)
        else:
            t = samples.detach().cpu() if isinstance(samples, torch.Tensor) else None
            arr = t.numpy() if t is not None else np.asarray(samples)
            if arr.dtype == np.uint8:
                self.uint8 = _as_rgb_nhwc(arr, "uint8 samples")
                self.description = f"uint8 array {tuple(arr.shape)}"
            elif arr.dtype.kind == "f":
                if arr.ndim != 4 or arr.shape[1] not in (1, 3):
                    raise ManifoldLabError(f"float samples must be (N, C, H, W) with C = 1 or 3 in [-1, 1], got shape "
                                           f"{tuple(arr.shape)}; uint8 samples are (N, H, W, 3)")
                bad = int((~np.isfinite(arr)).sum())
                if bad:
                    raise ManifoldLabError(f"the samples contain {bad} NaN/inf values; the generator is broken")
                self.float_images = torch.from_numpy(arr if arr.flags.writeable else np.array(arr))
                self.description = f"float array {tuple(arr.shape)}"
            else:
                raise ManifoldLabError(f"samples must be uint8 (N, H, W, 3) or float (N, C, H, W) in [-1, 1], "
                                       f"got dtype {arr.dtype}")
        held = self.uint8 if self.uint8 is not None else self.float_images
        self.n = int(held.shape[0])
        self.hw = (tuple(held.shape[1:3]) if self.uint8 is not None else tuple(held.shape[2:4]))
        if self.n == 0:
            raise ManifoldLabError(f"no samples in {self.description}; nothing to evaluate")

    def batch(self, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        if self.uint8 is not None:
            return uint8_to_images(self.uint8[lo:hi], device)
        # quantise like a written file would be, so an array and its npz give the same numbers
        return uint8_to_images(images_to_uint8(self.float_images[lo:hi]), device)


def _probe_reference(ref: Any) -> str | None:
    """Cheap checks of a reference before any feature is computed; returns the backbone name it fixes, if any."""
    if isinstance(ref, Reference):
        return ref.backbone
    src = os.fspath(ref)
    path = Path(src).expanduser()
    if path.suffix == ".safetensors":
        return _stats_backbone(path)
    if path.suffix == ".npz":
        keys = npz_keys(path)
        if "mu" in keys or "sigma" in keys:
            return "inception-v3-tf-fid@299"  # ADM statistics: Inception pool3
        if "arr_0" not in keys:
            raise ManifoldLabError(f"{path} holds neither mu/sigma nor images (arr_0); "
                                   "it is not an ADM reference batch")
        return None
    from manifold_lab.data import DATASETS

    if src not in DATASETS and not path.is_dir():
        raise DataError(f"unknown reference '{src}': not an .npz, a .safetensors stats file, a registered dataset "
                        f"({', '.join(DATASETS.names())}) or an existing folder")
    return None


def evaluate_samples(samples: str | os.PathLike | np.ndarray | torch.Tensor, ref: str | os.PathLike | Reference,
                     cfg: EvalConfig | None = None, progress: Progress | None = None, *, split: str = "train",
                     image_size: int | None = None, max_items: int | None = None,
                     cache_dir: str | os.PathLike | None = None, backbone: FIDBackbone | None = None,
                     shard: bool = True) -> dict[str, Any]:
    """FID, precision, recall and Inception Score of ``samples`` against ``ref`` (JSON-ready dict).

    ``samples``: an ADM ``.npz`` path, a uint8 array ``(N, H, W, 3)`` (or greyscale ``(N, H, W)``),
    or float images ``(N, C, H, W)`` in [-1, 1]. ``ref``: see the module docstring, or a
    :class:`Reference`. ``split`` / ``image_size`` (default: the samples' height) / ``max_items``
    apply to a dataset reference (see :func:`reference_stats`).

    ``progress(done, total)`` counts images through the backbone: the samples (this process's
    share), then the reference images (instant when cached); ``total`` grows when the reference
    stage starts and ``done == total`` only once everything is done (one bar for the whole call).
    ``backbone``: an already built FID backbone to use instead of ``cfg.backbone`` (e.g. one
    network for a sweep of evaluations). ``shard``: under ``torchrun``, every process must call
    this function (each extracts a block of the samples' features, then they are gathered); a
    caller that runs it on one rank only must pass ``shard=False`` (else the gather waits forever).
    """
    cfg = cfg if cfg is not None else EvalConfig()
    t_start = time.perf_counter()
    device = _resolve_device(cfg.device)
    fixed = _probe_reference(ref)
    adm = not isinstance(ref, Reference) and Path(os.fspath(ref)).suffix == ".npz" and fixed is not None
    where = "the reference" if isinstance(ref, Reference) else os.fspath(ref)
    if adm:  # before loading anything
        _require_inception(backbone.name if backbone is not None else cfg.backbone, where)
    if fixed is not None and backbone is None and cfg.backbone != "auto":
        _check_same_backbone(fixed, None, cfg.backbone, where)  # before loading anything
    source = _Samples(samples)
    net = backbone.to(device).eval() if backbone is not None else build_backbone(cfg.backbone, device,
                                                                                  reference_backbone=fixed)
    if adm:
        _require_inception(net.name, where)
    elif fixed is not None:
        _check_same_backbone(fixed, ref.backbone_identity if isinstance(ref, Reference) else None, net, where)

    # ---- sample features: a contiguous block per process, gathered -----------------------------
    sharded = shard and distributed.is_distributed()
    rank, world = (distributed.rank(), distributed.world_size()) if sharded else (0, 1)
    lo, hi = rank * source.n // world, (rank + 1) * source.n // world
    feats, logits = [], []
    with torch.no_grad():
        for b in range(lo, hi, cfg.batch_size):
            f, lg = net.features_and_logits(source.batch(b, min(hi, b + cfg.batch_size), device))
            feats.append(f.float().cpu())
            if lg is not None:
                logits.append(lg.float().cpu())
            if progress is not None:  # + 1: the metrics step, so the bar is not complete before the reference
                progress(min(hi, b + cfg.batch_size) - lo, hi - lo + 1)
    local_f = torch.cat(feats) if feats else torch.zeros(0, net.dim)
    local_l = torch.cat(logits) if logits else None
    if sharded:
        local_f = distributed.all_gather_rows(local_f.to(device)).cpu()
        if net.has_logits:
            width = local_l.shape[1] if local_l is not None else net.logits(source.batch(0, 1, device)).shape[1]
            local_l = local_l if local_l is not None else torch.zeros(0, width)
            local_l = distributed.all_gather_rows(local_l.to(device)).cpu()
    t_features = time.perf_counter() - t_start
    if rank != 0:
        return {"rank": rank, "n_samples": source.n, "note": "metrics are computed on rank 0"}

    # ---- reference and metrics on rank 0 -------------------------------------------------------
    t0 = time.perf_counter()
    if isinstance(ref, Reference):
        reference = ref
    else:
        n_own = hi - lo
        ref_progress = (lambda d, m: progress(n_own + d, n_own + m + 1)) if progress is not None else None
        reference = reference_stats(ref, net, split=split,
                                    image_size=image_size if image_size is not None else int(source.hw[0]),
                                    max_items=max_items, batch_size=cfg.batch_size, with_features=cfg.pr_max > 0,
                                    seed=cfg.seed, progress=ref_progress, cache_dir=cache_dir)
    if reference.dim != net.dim:
        raise ManifoldLabError(f"the reference statistics are {reference.dim}-d but {net.name} features are "
                               f"{net.dim}-d; use the backbone the reference was made with")
    t_reference = time.perf_counter() - t0

    t0 = time.perf_counter()
    mu, sigma = gaussian(local_f)
    fid = frechet_distance(reference.mu, reference.sigma, mu, sigma)
    result: dict[str, Any] = {
        "fid": float(fid["fid"]),
        "fid_sqrtm": fid["sqrtm_method"],
        "precision": None,
        "recall": None,
        "inception_score": None,
        "inception_score_std": None,
        "backbone": net.name,
        "n_samples": source.n,
        "n_reference": reference.n,
        "reference": reference.description,
        "samples": source.description,
        "sample_size": [int(v) for v in source.hw],
    }
    if cfg.pr_max == 0:
        result["pr_note"] = "precision/recall skipped (pr_max = 0)"
    elif reference.features is None:
        result["pr_note"] = "the reference has statistics only (no images/features): no precision/recall"
    elif min(reference.features.shape[0], source.n) <= cfg.pr_k:
        result["pr_note"] = f"precision/recall need more than pr_k={cfg.pr_k} points on each side"
    else:
        rng = np.random.default_rng(cfg.seed)
        ref_idx = _pick(rng, reference.features.shape[0], cfg.pr_max)
        fake_idx = _pick(rng, source.n, cfg.pr_max)
        pr = precision_recall(reference.features[ref_idx], local_f[fake_idx], k=cfg.pr_k, device=device)
        result.update(precision=pr["precision"], recall=pr["recall"], pr_k=cfg.pr_k,
                      pr_points={"reference": pr["n_real"], "samples": pr["n_fake"]})
    if local_l is not None and local_l.shape[0] > 0:
        splits = min(cfg.is_splits, source.n)
        is_mean, is_std = inception_score(local_l, splits)
        result.update(inception_score=is_mean, inception_score_std=is_std, inception_score_splits=splits,
                      inception_score_classifier=net.name)
    else:
        result["inception_score_note"] = (f"{net.name} has no classifier head (the TF-FID Inception file holds "
                                          "pool3 only), so no Inception Score")
    result["time_s"] = {"sample_features": round(t_features, 3), "reference": round(t_reference, 3),
                        "metrics": round(time.perf_counter() - t0, 3),
                        "total": round(time.perf_counter() - t_start, 3)}
    result["processes"] = world
    if progress is not None:
        progress(1, 1)  # everything done: close the bar
    return result


def _pick(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.arange(n) if n <= k else np.sort(rng.choice(n, size=k, replace=False))


__all__ = ["BACKBONES", "EvalConfig", "Reference", "build_backbone", "evaluate_samples", "gaussian",
           "inception_available", "load_reference", "reference_stats", "save_reference", "subset_indices"]
