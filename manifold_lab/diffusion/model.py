"""LightningDiT: the velocity network of latent diffusion, with RAE's optional wide DiT-DH head.

Why this architecture: LightningDiT (hustvl/LightningDiT, ``models/lightningdit.py``) is the DiT that
RAE, VA-VAE and most 2025 latent-diffusion papers train on tokenizer latents; comparing tokenizers by
gFID means training the same network on each tokenizer's latents. The DiT-DH head (bytetriper/RAE,
``stage2/models/DDT.py``, class ``DiTwDDTHead``) is RAE's answer to high-dimensional latents: a shallow
but wide transformer that re-reads ``x_t`` and is conditioned per token on the trunk's output.

Follows the reference
---------------------
* DiT's adaLN-Zero block (SiLU + Linear(D, 6D) giving shift/scale/gate for attention and MLP), with
  LightningDiT's options: RMSNorm pre-norms (timm's ``RmsNormFp32``, which like LightningDiT's RMSNorm
  normalises in float32 under autocast; LayerNorm without affine when ``rmsnorm=False``),
  qk-norm (a learnable RMSNorm / LayerNorm on each head's q and k), 2-D axial RoPE laid out like
  LightningDiT's ``VisionRotaryEmbeddingFast`` (first half of each head's dims rotated by the token's
  row, second half by its column, adjacent pairs rotated together, frequencies ``10000^(-2i/(d/2))``),
  SwiGLU MLP with hidden ``int(2/3 * mlp_ratio * D)`` (timm ``SwiGLUPacked``: one fused input matmul,
  ``silu(first half) * second half``, exactly LightningDiT's ``SwiGLUFFN``), the fixed 2-D sin-cos
  absolute position embedding added after the patch embedding, and the final layer
  (norm + adaLN shift/scale + zero-initialised Linear, then unpatchify).
* DiT's initialisation: xavier-uniform linears with zero biases, the patch embedding initialised like
  a linear, label table and time MLP N(0, 0.02), every adaLN modulation and the output Linear zero, so
  every block is exactly the identity at init and the network outputs exactly 0.
* DiT-DH head as in RAE's ``DiTwDDTHead``: the trunk's tokens ``s`` (no final layer on the trunk) are
  turned into per-token conditions ``Linear(silu(s + t_emb))`` at the head width; the head embeds
  ``x_t`` again with its own patch embedding (no absolute position embedding, RoPE at the head's head
  dim), runs ``head_depth`` adaLN-Zero blocks whose modulation is computed per token from that
  condition, and ends with its own (per-token modulated) final layer.

Our choices (where we differ from the references)
-------------------------------------------------
* Time: the package convention (``manifold_lab.diffusion``: t = 0 data, t = 1 noise). The network sees
  DiT's sinusoidal embedding (frequency dim 256, then an MLP) of ``t * 1000``: the sinusoid frequencies
  go from 1 down to 1e-4, so an argument in [0, 1] would leave most of them flat; scaled to [0, 1000]
  (DiT's discrete-step range) the whole band resolves time. RAE uses Gaussian Fourier features instead.
* Condition ``c = t_emb + y_emb`` as LightningDiT (RAE's DiT-DH applies an extra SiLU before its
  blocks' own SiLU; we do not). The null label ``num_classes`` always has a row in the label table
  (also when ``class_dropout_prob = 0``), so unconditional evaluation always works.
* RAE's DiT-DH keeps PyTorch's default Linear init unless asked; we use DiT's xavier init everywhere.
  The head uses the trunk's patch size (RAE allows two; its published configs use one).
* The pre-norms carry no learnable scale (LightningDiT's RMSNorm has one; next to adaLN's per-channel
  ``1 + scale`` it is redundant). The qk-norms do keep theirs, as in LightningDiT.
* Non-square latent grids are supported (the references assume square ones).
* The absolute position embedding is timm's ``build_sincos2d_pos_embed`` (via
  :func:`manifold_lab.nn.vit.sincos_pos_embed`): DiT's frequencies, channels in another order
  (``[sin_x, sin_y, cos_x, cos_y]`` instead of ``[sin_w, cos_w, sin_h, cos_h]``), which a network
  trained from scratch does not notice. It and the RoPE table are non-persistent buffers, so state
  dicts hold learnable weights only. Module names differ from the references': their checkpoints do
  not load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, RmsNormFp32, SwiGLUPacked
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from torch import nn

from manifold_lab.errors import ConfigError, ManifoldLabError
from manifold_lab.nn.vit import sincos_pos_embed, unpatchify
from manifold_lab.registry import Registry

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * TIME_SCALE (see module docstring)
TIME_FREQ_DIM = 256  # DiT's frequency embedding size
ROPE_THETA = 10000.0


# ----------------------------------------------------------------------------------------------------
# Sizes and config
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTSize:
    """Depth, width and heads of one named DiT size."""

    depth: int
    hidden_size: int
    num_heads: int


DIT_SIZES: Registry[DiTSize] = Registry("DiT size")
for _name, _dims in {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12),
                     "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items():
    DIT_SIZES.register(_name, partial(DiTSize, *_dims))


def dit_size_names() -> list[str]:
    """Names of the registered DiT sizes ("T" is the CPU size; "S".."XL" are DiT's)."""
    return DIT_SIZES.names()


@dataclass
class DiTConfig:
    """LightningDiT hyper-parameters; ``depth/hidden_size/num_heads = None`` take the value of ``size``.

    The ``None`` fields stay ``None`` (so ``size=B`` given later as an override still means B's widths);
    :meth:`dims` gives the resolved numbers, which the model and its checks use.
    """

    size: str = "T"
    patch_size: int = 1
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    qk_norm: bool = True
    rope: bool = True
    rmsnorm: bool = True
    swiglu: bool = True
    head_depth: int = 0  # 0 = no DiT-DH head
    head_width: int = 2048
    head_heads: int = 16
    fused_attention: bool = True  # F.scaled_dot_product_attention; False = explicit softmax(QK^T)V

    def __post_init__(self) -> None:
        if self.size not in DIT_SIZES:
            raise ConfigError(f"unknown DiT size {self.size!r}; valid sizes: {', '.join(dit_size_names())}")
        dims = self.dims()
        _check(self.patch_size >= 1, f"dit.patch_size must be >= 1, got {self.patch_size}")
        _check(dims.depth >= 1, f"dit.depth must be >= 1, got {dims.depth}")
        _check(dims.num_heads >= 1, f"dit.num_heads must be >= 1, got {dims.num_heads}")
        _check(dims.hidden_size >= 1 and dims.hidden_size % 4 == 0,
               f"dit.hidden_size must be a positive multiple of 4 (2-D sin-cos positions), got {dims.hidden_size}")
        _check(self.mlp_ratio > 0, f"dit.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(0.0 <= self.class_dropout_prob < 1.0,
               f"dit.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        _check_heads("dit.hidden_size", dims.hidden_size, "dit.num_heads", dims.num_heads, self.rope)
        _check(self.head_depth >= 0, f"dit.head_depth must be >= 0 (0 = no DiT-DH head), got {self.head_depth}")
        if self.head_depth > 0:
            _check(self.head_width >= 1, f"dit.head_width must be >= 1, got {self.head_width}")
            _check(self.head_heads >= 1, f"dit.head_heads must be >= 1, got {self.head_heads}")
            _check_heads("dit.head_width", self.head_width, "dit.head_heads", self.head_heads, self.rope)

    def dims(self) -> DiTSize:
        """Depth, width and heads of the trunk: the size's values with any explicit field taking over."""
        base = DIT_SIZES.build(self.size)
        return DiTSize(depth=base.depth if self.depth is None else int(self.depth),
                       hidden_size=base.hidden_size if self.hidden_size is None else int(self.hidden_size),
                       num_heads=base.num_heads if self.num_heads is None else int(self.num_heads))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_heads(width_key: str, width: int, heads_key: str, heads: int, rope: bool) -> None:
    _check(width % heads == 0, f"{width_key}={width} is not divisible by {heads_key}={heads}; pick a multiple")
    if rope:
        _check((width // heads) % 4 == 0,
               f"head dim {width}/{heads}={width // heads} must be a multiple of 4 for 2-D RoPE "
               f"(half per axis, rotated in pairs); change {width_key} or {heads_key}, or set dit.rope=false")


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


def axial_rope_table(grid: tuple[int, int], head_dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """(h*w, 2*head_dim) ``[sin | cos]`` table of LightningDiT's 2-D RoPE, tokens in raster order.

    Dims ``[0, head_dim/2)`` rotate with the row index, ``[head_dim/2, head_dim)`` with the column
    index; each adjacent pair (2i, 2i+1) shares a frequency (timm's interleaved ``rot`` layout).
    """
    h, w = grid
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (head_dim/4,)
    rows = (torch.arange(h, dtype=torch.float64)[:, None] * freqs).repeat_interleave(2, dim=-1)  # (h, half)
    cols = (torch.arange(w, dtype=torch.float64)[:, None] * freqs).repeat_interleave(2, dim=-1)  # (w, half)
    angles = torch.cat([rows[:, None, :].expand(h, w, half), cols[None, :, :].expand(h, w, half)], dim=-1)
    angles = angles.reshape(h * w, head_dim)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def _norm(dim: int, rmsnorm: bool, affine: bool) -> nn.Module:
    if rmsnorm:  # computed in float32 and cast back, like LightningDiT's RMSNorm (matters under autocast)
        return RmsNormFp32(dim, eps=1e-6, affine=affine)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)


class Attention(nn.Module):
    """Multi-head self-attention with optional qk-norm and RoPE (LightningDiT's ``Attention``)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rmsnorm: bool, fused: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _norm(self.head_dim, rmsnorm, affine=True) if qk_norm else nn.Identity()
        self.k_norm = _norm(self.head_dim, rmsnorm, affine=True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rot_embed_cat(q, rope).to(v.dtype)
            k = apply_rot_embed_cat(k, rope).to(v.dtype)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """adaLN-Zero pre-norm block; ``c`` is (B, 1, D) (one condition per sample) or (B, N, D) (per token)."""

    def __init__(self, dim: int, num_heads: int, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = _norm(dim, cfg.rmsnorm, affine=False)
        self.attn = Attention(dim, num_heads, cfg.qk_norm, cfg.rmsnorm, cfg.fused_attention)
        self.norm2 = _norm(dim, cfg.rmsnorm, affine=False)
        if cfg.swiglu:
            self.mlp = SwiGLUPacked(dim, hidden_features=2 * int(2 / 3 * cfg.mlp_ratio * dim))
        else:
            gelu = partial(nn.GELU, approximate="tanh")
            self.mlp = Mlp(dim, hidden_features=int(cfg.mlp_ratio * dim), act_layer=gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, rope)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class FinalLayer(nn.Module):
    """Norm, adaLN shift/scale (no gate), Linear to ``out_features`` per token."""

    def __init__(self, dim: int, out_features: int, rmsnorm: bool) -> None:
        super().__init__()
        self.norm = _norm(dim, rmsnorm, affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class TimestepEmbedder(nn.Module):
    """DiT's sinusoidal embedding of ``t * TIME_SCALE`` (``[cos | sin]``, max period 1e4) + 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = TIME_FREQ_DIM) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = (t.float() * TIME_SCALE)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class table with one extra row for the null label ``num_classes``; class dropout in training."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """``force_drop`` (bool, (B,)) replaces the random training-time dropout when given."""
        if force_drop is None and self.training and self.dropout_prob > 0:
            force_drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
        if force_drop is not None:
            y = torch.where(force_drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class DiTDHHead(nn.Module):
    """RAE's wide DDT head: re-embeds ``x_t`` and denoises it conditioned per token on the trunk."""

    def __init__(self, cfg: DiTConfig, in_channels: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        width, p, trunk_width = cfg.head_width, cfg.patch_size, cfg.dims().hidden_size
        self.x_embedder = PatchEmbed(input_size, p, in_channels, width, bias=True)
        self.s_projector = nn.Linear(trunk_width, width) if trunk_width != width else nn.Identity()
        self.blocks = nn.ModuleList(DiTBlock(width, cfg.head_heads, cfg) for _ in range(cfg.head_depth))
        self.final_layer = FinalLayer(width, p * p * in_channels, cfg.rmsnorm)
        grid = self.x_embedder.grid_size
        rope = axial_rope_table(grid, width // cfg.head_heads) if cfg.rope else None
        self.register_buffer("rope", rope, persistent=False)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        cond = self.s_projector(F.silu(s + t_emb[:, None, :]))  # (B, N, width), per-token condition
        h = self.x_embedder(x)
        for block in self.blocks:
            h = block(h, cond, self.rope)
        return self.final_layer(h, cond)


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------


class LightningDiT(nn.Module):
    """Class-conditional velocity network ``v(x_t, t, y)`` on a latent grid (see module docstring).

    ``forward(x, t, y)``: ``x`` (B, C, h, w) float, ``t`` (B,) in [0, 1] (t = 1 is noise), ``y`` (B,) long
    in ``[0, num_classes]`` with ``num_classes`` the null (unconditional) label. Returns the velocity
    ``eps - x_0``, shaped like ``x``. In training mode labels are replaced by the null label with
    probability ``cfg.class_dropout_prob``; in eval mode never.
    """

    def __init__(self, cfg: DiTConfig, in_channels: int, input_size: int | tuple[int, int], num_classes: int) -> None:
        super().__init__()
        grid = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        p = cfg.patch_size
        if len(grid) != 2 or min(grid) < 1 or grid[0] % p or grid[1] % p:
            raise ManifoldLabError(f"LightningDiT input_size {input_size} must be two positive sizes divisible by "
                                   f"patch_size={p}; change the patch size or the latent grid")
        if in_channels < 1 or num_classes < 1:
            raise ManifoldLabError(f"LightningDiT needs in_channels >= 1 and num_classes >= 1, got "
                                   f"{in_channels} and {num_classes}")
        self.cfg = cfg
        self.in_channels = int(in_channels)
        self.input_size: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.num_classes = int(num_classes)
        self.token_grid = (grid[0] // p, grid[1] // p)
        self.dims = cfg.dims()
        d = self.dims.hidden_size
        self.x_embedder = PatchEmbed(self.input_size, p, in_channels, d, bias=True)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(num_classes, d, cfg.class_dropout_prob)
        self.register_buffer("pos_embed", sincos_pos_embed(self.token_grid, d).unsqueeze(0), persistent=False)
        rope = axial_rope_table(self.token_grid, d // self.dims.num_heads) if cfg.rope else None
        self.register_buffer("rope", rope, persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(d, self.dims.num_heads, cfg) for _ in range(self.dims.depth))
        if cfg.head_depth > 0:
            self.head: DiTDHHead | None = DiTDHHead(cfg, in_channels, self.input_size)
            self.final_layer: FinalLayer | None = None
        else:
            self.head = None
            self.final_layer = FinalLayer(d, p * p * in_channels, cfg.rmsnorm)
        self.initialize_weights()

    # -- init ------------------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, linear-like patch embeds, N(0, .02) label/time, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        embedders = [self.x_embedder] + ([self.head.x_embedder] if self.head is not None else [])
        for emb in embedders:
            w = emb.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(emb.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        blocks = list(self.blocks) + (list(self.head.blocks) if self.head is not None else [])
        final = self.head.final_layer if self.head is not None else self.final_layer
        for mod in [b.adaLN_modulation[-1] for b in blocks] + [final.adaLN_modulation[-1], final.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    # -- forward ---------------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        want = (self.in_channels, *self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want or not x.is_floating_point():
            raise ManifoldLabError(f"LightningDiT expects float x of shape (B, {want[0]}, {want[1]}, {want[2]}), "
                                   f"got {x.dtype} {tuple(x.shape)}; pass latents on the grid it was built for")
        b = x.shape[0]
        if tuple(t.shape) != (b,) or not t.is_floating_point():
            raise ManifoldLabError(f"LightningDiT expects float t of shape ({b},), got {t.dtype} {tuple(t.shape)}")
        if tuple(y.shape) != (b,) or y.is_floating_point() or y.dtype == torch.bool:
            raise ManifoldLabError(f"LightningDiT expects integer labels y of shape ({b},), got {y.dtype} "
                                   f"{tuple(y.shape)}")
        # Value check costs one host sync; skipped while torch.compile traces (no data-dependent Python).
        if not torch.compiler.is_compiling() and b > 0 and bool(((y < 0) | (y > self.num_classes)).any()):
            raise ManifoldLabError(f"labels y must lie in [0, {self.num_classes}] ({self.num_classes} = null label), "
                                   f"got min {int(y.min())} max {int(y.max())}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, t, y)
        tokens = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        c = (t_emb + self.y_embedder(y))[:, None, :]  # (B, 1, D): one condition per sample
        for block in self.blocks:
            tokens = block(tokens, c, self.rope)
        if self.head is not None:
            out = self.head(x, tokens, t_emb)
        else:
            out = self.final_layer(tokens, c)
        return unpatchify(out, self.token_grid, self.cfg.patch_size, self.in_channels)

    # -- accounting ------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Number of learnable parameters (fixed position tables are buffers, not counted)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self) -> int:
        """Analytic forward FLOPs for one sample (one network evaluation).

        Counts every matmul: each Linear / patch embedding as ``2 * in * out`` per row it is applied to
        (per token, or once per sample for the time MLP and per-sample adaLN), and attention's ``QK^T``
        and ``AV`` as ``2 * N^2 * D`` each; a multiply-add is 2 FLOPs. Biases, norms, softmax, RoPE,
        activations and the modulation arithmetic are ignored (a few % at these widths). A training
        step costs about 3x this (forward + backward).
        """
        cfg = self.cfg
        n = self.token_grid[0] * self.token_grid[1]
        patch_in = cfg.patch_size ** 2 * self.in_channels

        def block(width: int, per_token_mod: bool) -> int:
            if cfg.swiglu:
                hid = int(2 / 3 * cfg.mlp_ratio * width)
                mlp = width * 2 * hid + hid * width
            else:
                hid = int(cfg.mlp_ratio * width)
                mlp = 2 * width * hid
            per_token = 3 * width * width + width * width + mlp
            mod = width * 6 * width * (n if per_token_mod else 1)
            return 2 * (n * per_token + mod) + 2 * 2 * n * n * width

        d = self.dims.hidden_size
        total = 2 * n * patch_in * d  # patch embedding
        total += 2 * (TIME_FREQ_DIM * d + d * d)  # time MLP
        total += self.dims.depth * block(d, per_token_mod=False)
        if cfg.head_depth > 0:
            w = cfg.head_width
            total += 2 * n * patch_in * w  # head patch embedding
            if d != w:
                total += 2 * n * d * w  # s projector
            total += cfg.head_depth * block(w, per_token_mod=True)
            total += 2 * n * (w * 2 * w + w * patch_in)  # per-token final adaLN + output linear
        else:
            total += 2 * (d * 2 * d) + 2 * n * d * patch_in  # final adaLN + output linear
        return int(total)
