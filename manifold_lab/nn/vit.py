"""Transformer pieces shared by RAE, SVG, PAE and UL: token stacks, MAE-style pixel decoder, patching.

Written with timm's ``Block`` (pre-norm attention + MLP, fused scaled-dot-product attention) and
timm's 2-D sin-cos position embedding, so the CPU-size and paper-size models are the same code with
different widths. Token grids are channel-first maps (B, D, h, w) at module boundaries, like every
latent in the package; inside, tokens are (B, h*w, D) in raster order (row-major, as ViTs use).
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (h*w, dim) in raster order (timm's build_sincos2d_pos_embed: the
    MAE / DiT frequencies, channels ordered [sin_x, sin_y, cos_x, cos_y] rather than DiT's [sin_w, cos_w,
    sin_h, cos_h]; the same for a network trained from scratch)."""
    return build_sincos2d_pos_embed(list(grid), dim=dim, reverse_coord=False)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h*w, D) in raster order."""
    return x.flatten(2).transpose(1, 2)


def to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) -> (B, D, h, w)."""
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"to_grid: {n} tokens do not fill a {grid[0]}x{grid[1]} grid")
    return tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C); inverse of :func:`unpatchify`."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int, channels: int = 3) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    b = tokens.shape[0]
    h, w = grid
    x = tokens.reshape(b, h, w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * patch, w * patch)


class TokenBlocks(nn.Module):
    """``depth`` timm pre-norm transformer blocks over a token sequence (B, N, D)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, qk_norm=qk_norm) for _ in range(depth))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


class ViTDecoder(nn.Module):
    """MAE-style decoder: latent grid (B, C_in, h, w) -> image (B, out_channels, h*patch, w*patch).

    Linear embedding of each latent token to ``width``, fixed sin-cos positions, ``depth`` transformer
    blocks, LayerNorm, and a linear head to ``patch*patch*out_channels`` pixels per token (unpatchified).
    :meth:`last_layer` is the head's weight: the layer at which adaptive loss weights (GAN, VF) compare
    gradient norms.
    """

    def __init__(self, in_channels: int, grid: tuple[int, int], patch: int, width: int = 256, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, out_channels: int = 3) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch = int(patch)
        self.out_channels = int(out_channels)
        self.embed = nn.Linear(in_channels, width)
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, width).unsqueeze(0), persistent=False)
        self.blocks = TokenBlocks(width, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, patch * patch * out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE/timm initialisation: xavier-uniform linears, zero biases, unit LayerNorms.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[-2:]) != self.grid:
            raise ValueError(f"ViTDecoder built for a {self.grid[0]}x{self.grid[1]} grid, got {tuple(z.shape)}")
        tokens = self.embed(to_tokens(z)) + self.pos_embed.to(z.dtype)
        tokens = self.norm(self.blocks(tokens))
        return unpatchify(self.head(tokens), self.grid, self.patch, self.out_channels)

    def last_layer(self) -> nn.Parameter:
        return self.head.weight
