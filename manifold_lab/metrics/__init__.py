"""Geometry metrics of latent spaces (SSC, LPC, GSQ, eRank) and the numbers reported beside them
(reconstruction, FID, generation precision/recall and IS, probes, latent statistics). Definitions: specs/metrics.md.

Every ``*_report`` / ``compute()`` result records the parameters it used. Accumulators keep
per-process partial state and reduce over processes once, at ``compute()``.
"""

from manifold_lab.metrics._inputs import MetricInputError
from manifold_lab.metrics.erank import effective_rank, erank_report
from manifold_lab.metrics.fid import FeatureStats, fid_from_features, frechet_distance, sqrtm_product
from manifold_lab.metrics.generation import inception_score, knn_radii, precision_recall
from manifold_lab.metrics.gsq import gsq, gsq_protocol
from manifold_lab.metrics.latent_stats import ChannelStats
from manifold_lab.metrics.lpc import LPCAccumulator, lpc, lpc_weights, path_lipschitz
from manifold_lab.metrics.probes import knn_accuracy, linear_probe, silhouette, tsne_2d, umap_2d
from manifold_lab.metrics.recon import ReconAccumulator, psnr, ssim
from manifold_lab.metrics.ssc import (SSCAccumulator, downsample_segments, ssc, ssc_clusters, ssc_per_image,
                                      ssc_report)

__all__ = [
    "MetricInputError",
    "effective_rank", "erank_report",
    "FeatureStats", "fid_from_features", "frechet_distance", "sqrtm_product",
    "inception_score", "knn_radii", "precision_recall",
    "gsq", "gsq_protocol",
    "ChannelStats",
    "LPCAccumulator", "lpc", "lpc_weights", "path_lipschitz",
    "knn_accuracy", "linear_probe", "silhouette", "tsne_2d", "umap_2d",
    "ReconAccumulator", "psnr", "ssim",
    "SSCAccumulator", "downsample_segments", "ssc", "ssc_clusters", "ssc_per_image", "ssc_report",
]
