"""Typed configuration of ``manifold-lab measure`` (YAML file + ``--set key=value`` overrides).

Defaults are the embedded CPU profile (Fashion-MNIST test split, about 3 minutes on 2 cores).
Every value here is written into ``metrics.json`` so that a number is never ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SSCConfig:
    """Spatial structure coherence on a dataset with instance masks (specs/metrics.md)."""

    num_scenes: int = 500          # scenes (or masked images) evaluated
    sigma: float = 0.1             # affinity temperature
    n_init: int = 10               # k-means restarts per image
    min_items: int = 2             # items per composed scene (embedded scenes only)
    max_items: int = 3
    examples: int = 4              # rows in the SSC example figure


@dataclass
class LPCConfig:
    """Local perceptual continuity: decode perturbed latents (specs/metrics.md)."""

    num_images: int = 256
    rhos: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)
    directions: int = 1            # random directions per image (each used as +u and -u)
    path_pairs: int = 64           # image pairs for the straight-path Lipschitz probe (0 disables)
    path_steps: int = 8


@dataclass
class GSQConfig:
    """Global semantic quality protocol: class subsets x images per class x repeats."""

    num_classes: int | None = None  # None = every class of the dataset (paper: 100 ImageNet classes)
    per_class: int | None = 100     # None = every image of each chosen class
    repeats: int = 5


@dataclass
class ProbeConfig:
    """t-SNE / UMAP maps of pooled latents, kNN accuracy, silhouette and a linear probe."""

    num_points: int = 2000
    tsne_perplexity: float = 30.0
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    knn_k: int = 10
    linear_probe: bool = True
    tsne: bool = True
    umap: bool = True


@dataclass
class MeasureConfig:
    """Everything ``measure`` computes and on what."""

    dataset: str = "fashion-mnist"  # a registered dataset name or an image folder (ImageNet layout)
    split: str = "test"
    masks: str | None = None        # folder of instance/panoptic mask PNGs for SSC (image folders)
    num_images: int = 10000         # images encoded for GSQ, eRank, probes and latent statistics
    recon_images: int = 5000        # images decoded for PSNR / SSIM / perceptual distance / rFID
    batch_size: int = 50            # CPU: small batches keep the backbones' activations in cache (2x faster than 250)
    seed: int = 0
    device: str = "auto"
    perceptual: str = "auto"        # "auto" | "lpips-alex" | "lpips-vgg" | "mobilenet-deep"
    fid_backbone: str = "mobilenet_v2"  # "mobilenet_v2" (cheap, CPU) | "inception" (TF-FID, paper numbers)
    ssc: SSCConfig = field(default_factory=SSCConfig)
    lpc: LPCConfig = field(default_factory=LPCConfig)
    gsq: GSQConfig = field(default_factory=GSQConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
