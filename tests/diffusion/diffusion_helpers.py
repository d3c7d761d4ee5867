"""Small shared pieces of the diffusion tests (a module with a unique name: several test folders have a
``conftest``, so ``from conftest import ...`` would pick whichever was imported first)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from manifold_lab.tokenizers import VAE, VAEConfig


def tiny_tokenizer() -> VAE:
    """16x16 images -> 4x8x8 latents with random (untrained) weights."""
    torch.manual_seed(0)
    cfg = VAEConfig(image_size=16, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=4)
    return VAE(cfg).eval()


class Toy(Dataset):
    """Labelled 16x16 images with a left/right asymmetry, so flips change the latents."""

    name = "toy"

    def __init__(self, n: int = 26) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
        self.x[..., :4] = 1.0
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])
