"""Figures for measurement reports, drawn from stored arrays only (no model is run here).

Every figure has labelled axes (with units where there are any), a legend where colours carry
meaning, and is saved as a 150-dpi PNG; the Markdown report adds the caption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from manifold_lab.io import atomic_path  # noqa: E402

DPI = 150


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _to_image(x: torch.Tensor) -> np.ndarray:
    """(3,H,W) in [-1,1] -> (H,W,3) in [0,1]."""
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def embedding_map(emb: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None, title: str,
                  method: str, path: Path) -> Path:
    """2-D t-SNE / UMAP map of pooled latents, one colour per class."""
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        sel = labels == c
        name = class_names[int(c)] if class_names is not None and int(c) < len(class_names) else str(int(c))
        ax.scatter(emb[sel, 0], emb[sel, 1], s=4, alpha=0.7, color=cmap(i % cmap.N), label=name, rasterized=True)
    ax.set_xlabel(f"{method} dimension 1 (a.u.)")
    ax.set_ylabel(f"{method} dimension 2 (a.u.)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=3, frameon=False,
              title="class", title_fontsize=8)
    return _save(fig, path)


def lpc_curve(per_rho: dict[str, float], lpc: float, distance_name: str, path: Path) -> Path:
    """Perceptual change of the decoded image against the perturbation scale rho."""
    rhos = sorted(float(r) for r in per_rho)
    vals = [per_rho[_key(per_rho, r)] for r in rhos]
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.plot(rhos, vals, "o-", color="C0", label="LPC$_\\epsilon$ per scale")
    ax.axhline(lpc, color="C3", ls="--", lw=1, label=f"weighted LPC = {lpc:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel(r"perturbation scale $\rho$ ($\epsilon = \rho\,\|z\|_2$)")
    ax.set_ylabel(f"perceptual distance ({distance_name})")
    ax.set_title("Local perceptual continuity (lower is smoother)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _key(d: dict, r: float):
    for k in d:
        if abs(float(k) - r) < 1e-12:
            return k
    raise KeyError(r)


def ssc_examples(images: torch.Tensor, segments: torch.Tensor, clusters: torch.Tensor, nmi: torch.Tensor,
                 path: Path) -> Path:
    """Rows of image | true segments (latent grid) | latent spectral clusters, NMI per row."""
    n = images.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6.0, 2.0 * n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i in range(n):
        axes[i, 0].imshow(_to_image(images[i]))
        seg = segments[i].numpy()
        cl = clusters[i].reshape(seg.shape).numpy()
        axes[i, 1].imshow(seg, cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
        axes[i, 2].imshow(_match_colours(cl, seg), cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
        axes[i, 2].set_title(f"NMI = {float(nmi[i]):.2f}", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title(f"true segments ({segments.shape[1]}x{segments.shape[2]})", fontsize=9)
    if n:
        axes[0, 2].set_title(f"latent clusters\nNMI = {float(nmi[0]):.2f}", fontsize=8)
    fig.suptitle("SSC examples: spectral clusters of latent tokens vs. ground truth", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _match_colours(clusters: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Relabel clusters by their majority true segment so that matching regions share a colour."""
    out = np.full_like(clusters, -1)
    used = set()
    for c in np.unique(clusters):
        vals, counts = np.unique(truth[clusters == c], return_counts=True)
        order = vals[np.argsort(-counts)]
        target = next((int(v) for v in order if int(v) not in used), None)
        if target is None:
            target = max(list(used) + [int(truth.max())]) + 1
        used.add(target)
        out[clusters == c] = target
    return out


def channel_stats(mean: Sequence[float], std: Sequence[float], path: Path, dead: Sequence[bool] | None = None) -> Path:
    """Per-channel latent mean with +/- one standard deviation."""
    c = len(mean)
    x = np.arange(c)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * c + 2), 3.4))
    colors = ["C3" if (dead is not None and dead[i]) else "C0" for i in range(c)]
    ax.bar(x, mean, color=colors, alpha=0.5, label="mean")
    ax.errorbar(x, mean, yerr=std, fmt="none", ecolor="k", capsize=2, label="± one std")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("latent channel")
    ax.set_ylabel("latent value (a.u.)")
    ax.set_title("Per-channel latent statistics" + (" (red: near-dead)" if dead is not None and any(dead) else ""),
                 fontsize=10)
    ax.set_xticks(x if c <= 40 else x[:: max(1, c // 20)])
    ax.legend(fontsize=8)
    return _save(fig, path)


def recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> Path:
    """Top row originals, bottom row reconstructions."""
    n = originals.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.4), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(_to_image(originals[i]))
        axes[1, i].imshow(_to_image(recons[i]))
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("recon.", fontsize=8)
    fig.suptitle("Reconstructions", fontsize=10)
    return _save(fig, path)
