"""Shared network blocks for the tokenizers: ViT token stacks and decoders built from timm layers.

Layer rule: ``manifold_lab.nn`` imports torch and timm only (never the tokenizers, metrics or train
packages), so every tokenizer and the diffusion model can use it.
"""

from manifold_lab.nn.vit import TokenBlocks, ViTDecoder, patchify, sincos_pos_embed, to_grid, to_tokens, unpatchify

__all__ = ["TokenBlocks", "ViTDecoder", "patchify", "sincos_pos_embed", "to_grid", "to_tokens", "unpatchify"]
