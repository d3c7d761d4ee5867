"""``manifold-lab measure``: profile a tokenizer's latent space (config, pipeline, results)."""

from manifold_lab.measure.config import GSQConfig, LPCConfig, MeasureConfig, ProbeConfig, SSCConfig

__all__ = ["MeasureConfig", "SSCConfig", "LPCConfig", "GSQConfig", "ProbeConfig"]
