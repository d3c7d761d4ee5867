"""Small shared pieces of the tokenizer tests (a module with a unique name: several test folders have a
``conftest``, so ``from conftest import ...`` would pick whichever was imported first)."""

from __future__ import annotations

from manifold_lab.tokenizers import VAEConfig


def tiny_config(**kw) -> VAEConfig:
    """16x16 images -> 4x8x8 latents (f2), a few thousand parameters."""
    base = dict(image_size=16, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=4)
    base.update(kw)
    return VAEConfig(**base)
