"""PAE's refined VFM targets: the stage that runs before the tokenizer is trained, then stays fixed.

PAE (Prior-Aligned AutoEncoder, arXiv 2605.07915) aligns its latent with two targets derived from
the frozen VFM's token grid ``F`` (B, D, h, w) rather than with ``F`` itself ("refined priors"):

* **structural target** ``T_struct`` (used by SSR, the token-Gram loss): the VFM features
  "upsampled, low-pass filtered (strength 0.4), downsampled back to latent resolution". The
  smoothing removes the token-level high-frequency noise of ViT features (artefact tokens,
  patch-boundary aliasing) so the Gram matrix SSR matches describes the image's layout, not noise.
* **semantic target** ``T_sem`` (used by SCR, the cosine loss): "a light projector maps VFM
  features to C channels while a deprojector reconstructs the VFM features from them". The
  projector is trained once, on frozen-VFM features of training images, and then frozen; its
  C-channel output lives in the latent's own space (per-token RMS 1, like the PAE latent), so SCR
  compares like with like.

``mode: raw`` switches the refinement off (the ablation "raw vs refined targets"): SSR then uses
``F`` and SCR needs features in C channels some other way (the PAE model decides).

What the public release does and does not show
----------------------------------------------
The official release (github.com/ZhengrongYue/PAE, ``pae_with_generator/tokenizer/pae.py``,
``encoders.py``, ``latents.py``) is inference-only: it contains the frozen encoder, DAM, compressor,
decompressor and decoder, but not the training losses or this target stage. The exact filter and
the projector's loss are therefore this module's own choices, made to follow the paper's sentences:

* **low-pass filter** -- nearest-neighbour upsampling by ``upsample`` (each token becomes a
  ``u x u`` block), a separable Gaussian blur whose standard deviation is ``strength`` *latent
  tokens* (``strength * upsample`` fine pixels; reflect padding), then ``u x u`` average pooling
  back to the latent grid. ``strength`` is thus the blur radius in token units: 0 is exactly the
  identity (nearest-up then average-down cancel); with ``upsample`` 4, 0.4 keeps 0.39 of the
  amplitude at the token grid's Nyquist frequency and 0.71 at half of it (measured, and pinned by a
  test); 1.0 keeps under 0.01 at Nyquist. Upsampling first lets the blur act below one token: the
  same Gaussian sampled on the coarse grid (``upsample`` 1) would keep 0.84 at Nyquist.
* **projector** -- per-token MLPs ``D -> hidden -> C`` (GELU) with a per-token RMS normalisation
  without affine at the end (as the PAE latent: ``latents.RMSNorm(per-token)`` in the release), and
  ``C -> hidden -> D`` for the deprojector. Features are standardised per channel first (mean/std
  over the training features, stored as buffers), so the same learning rate works for a DINOv2
  (unit-scale after its affine-free LayerNorm) and for MobileNetV2 maps (arbitrary scale). Loss:
  ``recon_weight * ||deproj(proj(f)) - f||^2 / ||f||^2`` (relative feature reconstruction, in the
  standardised space) ``+ cosine_weight * mean_tokens(1 - cos(deproj(proj(f)), f))`` (keeps each
  token's direction: the semantics the cosine-based SCR will look at) ``+ relation_weight *
  ||S(proj(f)) - S(f)||^2`` where ``S`` is the token-token cosine-similarity matrix (keeps which
  tokens are alike; 0 by default).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from manifold_lab.errors import CheckpointError, ConfigError, ManifoldLabError
from manifold_lab.io import load_tensors, save_tensors

TARGET_MODES = ("raw", "refined")
PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_FORMAT = "manifold-lab-pae-projector"
#: features larger than this (float32 bytes) skip the disk cache and are held in float16
FEATURE_CACHE_LIMIT = 2 * 1024 ** 3


@dataclass
class TargetConfig:
    """How PAE's alignment targets are made (the ``targets`` section of the PAE config).

    Paper values are the defaults; the CPU recipe shrinks ``projector_*`` only.
    """

    mode: str = "refined"  # "raw": targets are the VFM features as they are; "refined": this module
    lowpass_strength: float = 0.4  # Gaussian sigma in latent tokens (0 = no filtering)
    upsample: int = 4  # fine grid = upsample x latent grid while filtering
    projector_hidden: int = 512  # hidden width of the projector and deprojector MLPs
    projector_steps: int = 2000  # Adam steps
    projector_lr: float = 1e-3
    projector_batch_size: int = 64  # images per step
    projector_images: int = 2048  # training images whose VFM features train it (0 = all); the features
    # are held in memory (and in the shared feature cache): DINOv2-L at 16x16 is 1 MiB per image
    projector_recon_weight: float = 1.0  # relative MSE of deproj(proj(f)) against f
    projector_cosine_weight: float = 1.0  # per-token 1 - cos(deproj(proj(f)), f)
    projector_relation_weight: float = 0.0  # token-similarity matrix of proj(f) against f's
    projector_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in TARGET_MODES:
            raise ConfigError(f"pae targets: mode must be one of {', '.join(TARGET_MODES)}, got {self.mode!r}")
        if not (isinstance(self.lowpass_strength, (int, float)) and 0.0 <= float(self.lowpass_strength) <= 8.0):
            raise ConfigError(
                "pae targets: lowpass_strength is a Gaussian sigma in latent tokens, in [0, 8]; "
                f"got {self.lowpass_strength}")
        self.lowpass_strength = float(self.lowpass_strength)
        positive = {"upsample": self.upsample, "projector_hidden": self.projector_hidden,
                    "projector_steps": self.projector_steps, "projector_batch_size": self.projector_batch_size}
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"pae targets: {key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.projector_images, int) or self.projector_images < 0:
            raise ConfigError(f"pae targets: projector_images must be >= 0 (0 = all), got {self.projector_images!r}")
        if not self.projector_lr > 0 or not math.isfinite(self.projector_lr):
            raise ConfigError(f"pae targets: projector_lr must be > 0, got {self.projector_lr}")
        weights = {"projector_recon_weight": self.projector_recon_weight,
                   "projector_cosine_weight": self.projector_cosine_weight,
                   "projector_relation_weight": self.projector_relation_weight,
                   "projector_weight_decay": self.projector_weight_decay}
        for key, value in weights.items():
            if not value >= 0 or not math.isfinite(value):
                raise ConfigError(f"pae targets: {key} must be a finite number >= 0, got {value}")
        if self.projector_recon_weight + self.projector_cosine_weight + self.projector_relation_weight <= 0:
            raise ConfigError("pae targets: at least one projector loss weight must be > 0 "
                              "(projector_recon_weight, projector_cosine_weight, projector_relation_weight)")

    def projector_key(self) -> dict[str, Any]:
        """The settings a trained projector depends on (compared when a saved one is reused)."""
        return {k: v for k, v in asdict(self).items() if k.startswith("projector_")}


# ----------------------------------------------------------------------------------------------
# structural target
# ----------------------------------------------------------------------------------------------
def _gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depthwise separable Gaussian blur of (B, D, H, W) with reflect padding (sigma in pixels)."""
    if sigma <= 0:
        return x
    b, d, h, w = x.shape
    k = _gaussian_kernel1d(sigma, x.dtype, x.device)
    r = (k.numel() - 1) // 2
    y = x.reshape(b * d, 1, h, w)
    # reflect padding needs pad < size; fall back to replicate on tiny maps
    mode = "reflect" if r < min(h, w) else "replicate"
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return y.reshape(b, d, h, w)


def structural_target(feats: torch.Tensor, strength: float = 0.4, upsample: int = 4) -> torch.Tensor:
    """PAE's T_struct: VFM tokens (B, D, h, w) -> upsampled, low-pass filtered, back to (B, D, h, w).

    ``strength`` is the Gaussian's standard deviation in latent tokens (see the module docstring);
    0 returns ``feats`` unchanged (bit-exact copy). Runs without autograd: targets are constants.
    """
    if feats.ndim != 4:
        raise ManifoldLabError(f"structural_target expects features (B,D,h,w), got shape {tuple(feats.shape)}")
    if strength < 0:
        raise ManifoldLabError(f"structural_target: strength must be >= 0, got {strength}")
    upsample = int(upsample)
    if upsample < 1:
        raise ManifoldLabError(f"structural_target: upsample must be >= 1, got {upsample}")
    with torch.no_grad():
        if strength == 0:
            return feats.detach().clone()
        dtype = feats.dtype
        x = feats.detach().float()
        h, w = x.shape[-2:]
        if upsample > 1:
            x = F.interpolate(x, scale_factor=upsample, mode="nearest")
        x = gaussian_blur(x, strength * upsample)
        if upsample > 1:
            x = F.avg_pool2d(x, kernel_size=upsample, stride=upsample)
        assert tuple(x.shape[-2:]) == (h, w)
        return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# semantic projector
# ----------------------------------------------------------------------------------------------
def rms_normalize_tokens(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token RMS normalisation without affine on (B, C, h, w): every C-vector gets RMS 1."""
    return x * torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + eps).to(x.dtype)


class SemanticProjector(nn.Module):
    """VFM features (B, D, h, w) <-> C-channel semantic targets (B, C, h, w).

    ``project`` standardises each feature channel (``feat_mean``/``feat_std``, set from training
    features by :meth:`set_feature_stats`), applies a per-token MLP D -> hidden -> C and RMS-normalises
    each token (the PAE latent's normalisation), so targets and latents share one scale.
    ``deproject`` maps C back to D in the *original* feature scale.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, rms_norm: bool = True) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden) < 1:
            raise ConfigError(f"SemanticProjector: dimensions must be >= 1, got in={in_dim} out={out_dim} "
                              f"hidden={hidden}")
        self.in_dim, self.out_dim, self.hidden = int(in_dim), int(out_dim), int(hidden)
        self.rms_norm = bool(rms_norm)
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.deproj = nn.Sequential(nn.Linear(out_dim, hidden), nn.GELU(), nn.Linear(hidden, in_dim))
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))

    @torch.no_grad()
    def set_feature_stats(self, feats: torch.Tensor) -> None:
        """Per-channel mean/std of features (N, D, h, w) used to standardise the projector's input."""
        total = torch.zeros(self.in_dim, dtype=torch.float64)
        sq = torch.zeros(self.in_dim, dtype=torch.float64)
        count = 0
        for chunk in feats.detach().split(256):  # chunked: paper-scale features do not fit twice in memory
            c = chunk.to("cpu", torch.float64).transpose(0, 1).reshape(self.in_dim, -1)
            total += c.sum(dim=1)
            sq += c.pow(2).sum(dim=1)
            count += c.shape[1]
        mean = total / count
        var = (sq - count * mean.pow(2)).clamp_min(0) / max(count - 1, 1)
        self.feat_mean.copy_(mean.float())
        self.feat_std.copy_(var.sqrt().float().clamp_min(1e-6))

    def _check(self, x: torch.Tensor, dim: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != dim:
            raise ManifoldLabError(f"SemanticProjector.{what} expects (B,{dim},h,w), got shape {tuple(x.shape)}")

    def standardize(self, f: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1)
        return (f - self.feat_mean.to(f.dtype).view(view)) / self.feat_std.to(f.dtype).view(view)

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) VFM features -> (B, C, h, w) targets (per-token RMS 1 when ``rms_norm``)."""
        self._check(f, self.in_dim, "project")
        t = self.proj(self.standardize(f).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return rms_normalize_tokens(t) if self.rms_norm else t

    def deproject(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> reconstructed VFM features (B, D, h, w) in the original feature scale."""
        self._check(t, self.out_dim, "deproject")
        g = self.deproj(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        view = (1, -1, 1, 1)
        return g * self.feat_std.to(g.dtype).view(view) + self.feat_mean.to(g.dtype).view(view)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.project(f)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, hidden={self.hidden}, rms_norm={self.rms_norm}"


def _token_cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    t = F.normalize(x.flatten(2).transpose(1, 2), dim=-1)  # (B, N, D)
    return t @ t.transpose(1, 2)


def projector_loss(projector: SemanticProjector, feats: torch.Tensor,
                   cfg: TargetConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The projector/deprojector objective on a batch of VFM features (see the module docstring)."""
    target = projector.standardize(feats)
    t = projector.project(feats)
    rec = projector.standardize(projector.deproject(t))
    logs: dict[str, float] = {}
    loss = feats.new_zeros(())
    if cfg.projector_recon_weight > 0:
        rel = (rec - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
        loss = loss + cfg.projector_recon_weight * rel
        logs["recon"] = float(rel.detach())
    if cfg.projector_cosine_weight > 0:
        cos = 1.0 - F.cosine_similarity(rec, target, dim=1, eps=1e-6).mean()
        loss = loss + cfg.projector_cosine_weight * cos
        logs["cos"] = float(cos.detach())
    if cfg.projector_relation_weight > 0:
        rel_s = (_token_cosine_matrix(t) - _token_cosine_matrix(target)).pow(2).mean()
        loss = loss + cfg.projector_relation_weight * rel_s
        logs["relation"] = float(rel_s.detach())
    logs["loss"] = float(loss.detach())
    return loss, logs


def _encoder_identity(encoder: Any) -> str:
    ident = getattr(encoder, "identity", None)
    if callable(ident):
        try:
            return str(ident())
        except Exception:  # noqa: BLE001 - identity is informative only
            pass
    return type(encoder).__name__


def _metadata(cfg: TargetConfig, in_dim: int, out_dim: int, encoder_id: str, seed: int,
              history: list[float]) -> dict[str, str]:
    return {
        "format": PROJECTOR_FORMAT,
        "in_dim": str(in_dim), "out_dim": str(out_dim), "hidden": str(cfg.projector_hidden),
        "encoder": encoder_id, "seed": str(seed),
        "settings": json.dumps(cfg.projector_key(), sort_keys=True),
        "loss_first": repr(history[0]) if history else "nan",
        "loss_last": repr(history[-1]) if history else "nan",
    }


def _images_of(item: Any) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _select_indices(n_total: int, n_used: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_total, generator=g)
    return perm[: (n_total if n_used <= 0 else min(n_used, n_total))]


class _Progress:
    """A rich progress bar when asked for on a terminal, two plain lines when asked for elsewhere
    (logs of batch jobs), nothing otherwise."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self._bar = None
        self._console = None
        self._label, self._total, self._info = label, total, ""
        if not enabled:
            return
        import time

        from rich.console import Console

        self._start = time.perf_counter()
        self._console = Console(stderr=True)
        if not self._console.is_terminal:
            self._console.print(f"{label}: {total} ...", markup=False, highlight=False)
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                             TextColumn("{task.fields[info]}"), console=self._console, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, info="")

    def update(self, advance: int = 1, info: str | None = None) -> None:
        if info is not None:
            self._info = info
        if self._bar is not None:
            fields = {} if info is None else {"info": info}
            self._bar.update(self._task, advance=advance, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._console is not None:
            import time

            self._console.print(f"{self._label}: done in {time.perf_counter() - self._start:.1f}s  {self._info}",
                                markup=False, highlight=False)
        self._console = None


@torch.no_grad()
def _extract_features(encoder: Callable[[torch.Tensor], torch.Tensor], dataset: Any, indices: torch.Tensor,
                      batch_size: int, device: torch.device, progress: bool, seed: int = 0) -> torch.Tensor:
    """Frozen-VFM features of ``dataset[indices]`` (N, D, h, w) on the CPU.

    When the encoder has an ``identity()`` and the dataset a ``cache_key``, they go through the shared
    on-disk feature cache (:mod:`manifold_lab.encoders.feature_cache`), so the ablation runs of one
    recipe (same encoder, data, seed and image count) extract them once."""
    bar = _Progress(progress, len(indices), "pae targets: VFM features")
    ident, data_key = getattr(encoder, "identity", None), getattr(dataset, "cache_key", None)
    dim, grid = getattr(encoder, "embed_dim", None), getattr(encoder, "grid_size", None)
    big = isinstance(dim, int) and grid is not None and \
        len(indices) * dim * int(grid[0]) * int(grid[1]) * 4 > FEATURE_CACHE_LIMIT
    try:
        if callable(ident) and isinstance(data_key, str) and not big:
            from torch.utils.data import Subset

            from manifold_lab.encoders.feature_cache import cached_features

            key = f"{data_key}|pae-projector-subset:seed={seed},n={len(indices)}"
            last = [0]

            def tick(done: int, total: int) -> None:
                bar.update(done - last[0])
                last[0] = done

            out = cached_features(encoder, str(ident()), Subset(dataset, indices.tolist()), key,
                                  batch_size=batch_size, progress=tick, device=device)
            return out["features"].float()
        feats = []
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size].tolist()
            x = torch.stack([_images_of(dataset[i]) for i in idx]).to(device)
            f = encoder(x).float().cpu()
            feats.append(f.half() if big else f)  # > 2 GiB of float32 features: keep float16 in memory
            bar.update(len(idx))
        return torch.cat(feats)
    finally:
        bar.close()


def load_semantic_projector(path: str | Path, cfg: TargetConfig, in_dim: int, out_dim: int,
                            encoder_id: str | None = None) -> SemanticProjector:
    """Read a projector saved by :func:`train_semantic_projector`; a mismatch is one CheckpointError line."""
    from safetensors import safe_open

    path = Path(path)
    tensors = load_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # pragma: no cover - load_tensors already validated the file
        raise CheckpointError(f"{path}: unreadable projector metadata ({exc})") from exc
    if meta.get("format") != PROJECTOR_FORMAT:
        raise CheckpointError(f"{path} is not a PAE projector file (format {meta.get('format')!r}); delete it "
                              "to retrain the projector")
    want = {"in_dim": str(in_dim), "out_dim": str(out_dim), "hidden": str(cfg.projector_hidden),
            "settings": json.dumps(cfg.projector_key(), sort_keys=True)}
    if encoder_id is not None:
        want["encoder"] = encoder_id
    diff = [k for k, v in want.items() if meta.get(k) != v]
    if diff:
        shown = ", ".join(f"{k}: file {meta.get(k)!r} vs now {want[k]!r}" for k in diff[:2])
        raise CheckpointError(f"{path} was trained for other settings ({shown}); delete it to retrain the "
                              "projector, or use another run_dir")
    projector = SemanticProjector(in_dim, out_dim, cfg.projector_hidden)
    expected = projector.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{path}: projector tensors do not match a {in_dim}->{out_dim} (hidden "
                              f"{cfg.projector_hidden}) projector; delete it to retrain")
    projector.load_state_dict(tensors, strict=True)
    projector.history = [float(meta.get("loss_first", "nan")), float(meta.get("loss_last", "nan"))]
    projector.loaded_from = str(path)
    return _freeze(projector)


def _freeze(projector: SemanticProjector) -> SemanticProjector:
    projector.eval()
    for p in projector.parameters():
        p.requires_grad_(False)
    return projector


def _device_of(encoder: Any) -> torch.device:
    for tensor in list(getattr(encoder, "parameters", lambda: [])()) + list(getattr(encoder, "buffers", lambda: [])()):
        return tensor.device
    return torch.device("cpu")


def train_semantic_projector(encoder: Callable[[torch.Tensor], torch.Tensor], dataset: Any, cfg: TargetConfig,
                             run_dir: str | Path | None, progress: bool = False, *, out_dim: int,
                             seed: int = 0, device: str | torch.device | None = None) -> SemanticProjector:
    """Train (or reload) the projector on frozen-VFM features of training images.

    ``encoder``: images (B,3,H,W) in [-1,1] -> features (B,D,h,w) (the frozen VFM). ``out_dim``: the
    latent's channel count C. The result is saved atomically to
    ``run_dir/targets/projector.safetensors`` and reused when that file exists (a second call does not
    retrain; a file made with other settings raises a CheckpointError). The projector comes back in
    eval mode with frozen parameters and a ``history`` list of losses (first and last when loaded).
    """
    if len(dataset) == 0:
        raise ManifoldLabError("pae targets: the training dataset is empty; the projector needs images")
    dev = torch.device(device) if device is not None else _device_of(encoder)
    encoder_id = _encoder_identity(encoder)
    path = Path(run_dir) / "targets" / PROJECTOR_FILE if run_dir is not None else None
    if path is not None and path.is_file():
        return load_semantic_projector(path, cfg, _feature_dim(encoder, dataset, dev), out_dim, encoder_id).to(dev)

    indices = _select_indices(len(dataset), cfg.projector_images, seed)
    feats = _extract_features(encoder, dataset, indices, cfg.projector_batch_size, dev, progress, seed)
    in_dim = int(feats.shape[1])
    with torch.random.fork_rng(devices=[]):  # same init for the same seed; the global RNG is untouched
        torch.manual_seed(seed)
        projector = SemanticProjector(in_dim, out_dim, cfg.projector_hidden)
    projector = projector.to(dev)
    projector.set_feature_stats(feats)
    opt = torch.optim.AdamW(projector.parameters(), lr=cfg.projector_lr, weight_decay=cfg.projector_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.projector_steps, eta_min=cfg.projector_lr * 0.1)
    g = torch.Generator().manual_seed(seed + 1)
    bs = min(cfg.projector_batch_size, len(feats))
    history: list[float] = []
    bar = _Progress(progress, cfg.projector_steps, "pae targets: projector")
    projector.train()
    try:
        for step in range(cfg.projector_steps):
            batch = feats[torch.randint(len(feats), (bs,), generator=g)].to(dev, torch.float32)
            loss, logs = projector_loss(projector, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(logs["loss"])
            if not math.isfinite(logs["loss"]):
                raise ManifoldLabError(f"pae targets: projector loss became {logs['loss']} at step {step}; "
                                       "lower targets.projector_lr")
            bar.update(1, "  ".join(f"{k}={v:.4f}" for k, v in logs.items()))
    finally:
        bar.close()
    _freeze(projector)
    projector.history = history
    projector.loaded_from = None
    if path is not None:
        save_tensors(path, projector.state_dict(),
                     metadata=_metadata(cfg, in_dim, out_dim, encoder_id, seed, history))
    return projector


@torch.no_grad()
def _feature_dim(encoder: Any, dataset: Any, device: torch.device) -> int:
    dim = getattr(encoder, "embed_dim", None)
    if isinstance(dim, int):
        return dim
    x = _images_of(dataset[0]).unsqueeze(0).to(device)
    return int(encoder(x).shape[1])


# ----------------------------------------------------------------------------------------------
# TokenizerSpec.prepare hook
# ----------------------------------------------------------------------------------------------
def pae_prepare(model: Any, recipe: Any, dataset: Any, run_dir: str | Path | None, progress: bool = True) -> None:
    """PAE's pre-stage: with ``targets.mode == "refined"`` train (or reload) the semantic projector and
    hand it to the model (``model.set_semantic_projector``). ``mode: raw`` does nothing.

    The projector trains on the device the recipe trains on, from ``model.frozen("vfm")`` features.
    Under ``torchrun`` only rank 0 trains it; the other processes wait and load the saved file.
    """
    targets = getattr(model.config, "targets", None)
    if targets is None or targets.mode != "refined":
        return
    from manifold_lab import distributed
    from manifold_lab.train.device import resolve_device

    # Under torchrun the trainer would join the process group later; join it now (idempotent) so
    # that each process uses its own GPU and only rank 0 extracts features and trains the projector.
    distributed.init_from_env()
    shared = distributed.is_distributed() and run_dir is not None
    train = getattr(recipe, "train", None)
    device = resolve_device(getattr(train, "device", "auto"))
    seed = int(getattr(train, "seed", 0))
    encoder = model.frozen("vfm")
    home = _device_of(encoder)
    if home != device:
        encoder.to(device)
    try:
        if shared and not distributed.is_main_process():
            distributed.barrier()  # rank 0 trains and saves; the others then load its file
        projector = train_semantic_projector(encoder, dataset, targets, run_dir,
                                             progress and distributed.is_main_process(),
                                             out_dim=int(model.z_channels), seed=seed, device=device)
        if shared and distributed.is_main_process():
            distributed.barrier()
    finally:
        if home != device:
            encoder.to(home)
    model.set_semantic_projector(projector.to(home))


def settings_digest(cfg: TargetConfig) -> str:
    """Short hash of the projector settings (for logs and cache names)."""
    return hashlib.sha256(json.dumps(cfg.projector_key(), sort_keys=True).encode()).hexdigest()[:12]


__all__ = ["TargetConfig", "TARGET_MODES", "structural_target", "gaussian_blur", "rms_normalize_tokens",
           "SemanticProjector", "projector_loss", "train_semantic_projector", "load_semantic_projector",
           "pae_prepare", "settings_digest", "PROJECTOR_FILE"]
