"""Converter for the official PAE release (github.com/ZhengrongYue/PAE, weights on the Hugging Face
hub as ``yuezhengrong/PAE-collections``, e.g. ``AE-models/dinov2-large.pt``) into manifold-lab's PAE.

Official layout (read from the release's inference code: ``pae_with_generator/tokenizer/pae.py``,
``encoders.py`` (``DeltaEncoder``), ``latents.py`` (``RMSNorm``) and ``decoders.py`` (RAE's
``GeneralDecoder``)). The checkpoint is ``torch.save({"model": state_dict, ...})``; keys may carry
``module.`` / ``_orig_mod.`` prefixes. With D the VFM width (1024 for DINOv2-L), C the latent
channels (32), W/L/M the decoder width/depth/MLP width, p the decoder patch (16), q the VFM patch (14)
and N = (224/q)^2 = 256 tokens:

=====================================================  ===============================================
official key group                                     goes to (manifold-lab PAE)
=====================================================  ===============================================
``encoder.*`` (frozen DINOv2 inside RAE's               not converted: the frozen VFM lives outside the
``Dinov2withNorm``)                                    state dict and is rebuilt from its own weights
                                                       file (``encoder_weights``); these keys are
                                                       accepted and skipped
``delta_encoder.patch_embed.proj.{weight,bias}``       ``pixel.patch_embed.*``; the release feeds it
  [D,3,q,q]                                            ImageNet-normalised [0,1] pixels, ours [-1,1]:
                                                       the affine map is folded into the weights
``delta_encoder.pos_embed`` [1,N,D] (fixed sin-cos)    not a parameter here (fixed table); checked:
                                                       MAE's (x, y) sin/cos order is a channel
                                                       permutation of timm's, so the whole DAM
                                                       residual stream is permuted to match (exact)
``delta_encoder.layers.{i}.norm1``                     ``pixel.blocks.{i}.norm1``
``...self_attn.qkv`` [3D,D], ``...self_attn.proj``     ``pixel.blocks.{i}.attn.qkv`` / ``attn.proj``
``...norm2_q`` / ``...norm2_kv``                       ``pixel.blocks.{i}.norm2`` / ``norm_ctx``
``...cross_attn.q_proj``                               ``pixel.blocks.{i}.cross.q``
``...cross_attn.{k_proj,v_proj}``                      ``pixel.blocks.{i}.cross.kv`` (rows [k; v])
``...cross_attn.proj``                                 ``pixel.blocks.{i}.cross.proj``
``...norm3``, ``...mlp.fc1``, ``...mlp.fc2``           ``pixel.blocks.{i}.norm3``, ``mlp.fc1/fc2``
``...ls{1,2,3}.gamma`` (only with init_values)         folded into the preceding output projection
``delta_encoder.fusion_proj`` [2D,D] (SFT)             ``sft`` (gamma = first D rows, beta = last D)
``delta_encoder.final_ln.{weight,bias}`` [D]           the SFT LayerNorm's affine (see gaps below)
``latent_compressor.0.{qkv,proj}`` (bare timm           the compressor's attention
Attention, no norm/residual/MLP)
``latent_compressor.1.{weight,bias}`` [C,D,3,3]        ``to_latent``
(``latent_compressor.2`` = RMSNorm without affine:     -- (no tensors; per-token RMS norm, eps 1e-6)
no keys)
``latent_decompressor.0.{weight,bias}`` [D,C,3,3]      ``from_latent``
``latent_decompressor.1.{qkv,proj}``                   the decompressor's attention
``decoder.decoder_embed`` [W,D]                        ``decoder.embed``
``decoder.trainable_cls_token`` [1,1,W]                ``decoder.cls_token``
``decoder.decoder_pos_embed`` [1,N+1,W] (fixed)        ``decoder.pos_embed`` (copied)
``decoder.decoder_layers.{i}.attention.attention.      ``decoder.blocks.{i}.q`` / ``k`` / ``v``
{query,key,value}``
``...attention.output.dense``                          ``decoder.blocks.{i}.proj``
``...layernorm_before`` / ``...layernorm_after``       ``decoder.blocks.{i}.norm1`` / ``norm2``
``...intermediate.dense`` / ``...output.dense``        ``decoder.blocks.{i}.fc1`` / ``fc2``
``decoder.decoder_norm``                               ``decoder.norm``
``decoder.decoder_pred`` [p*p*3, W]                    ``decoder.head``; the release un-normalises its
                                                       output (x*std+mean in [0,1]); that affine map
                                                       and [0,1] -> [-1,1] are folded into the head
=====================================================  ===============================================

Where manifold-lab's PAE cannot hold the release exactly, conversion stops with one
:class:`CheckpointError` line naming what is missing (the converter never builds a network that
silently computes something else). The release differs from the trainable PAE in: (1) its
compressor and decompressor attention is a *bare* timm ``Attention`` (no LayerNorm, no residual, no
MLP); (2) the DAM has no LayerNorm between its last block and the SFT projection; (3) the SFT
LayerNorm ``final_ln`` has an affine and eps 1e-5 and the fusion is ``final_ln(F(1+gamma)+beta)``;
(4) the DAM sees the image resized (bicubic) to the VFM input size (224, patch 14) while the decoder
predicts 16x16 patches of a 256 image; (5) the decoder is RAE's HF-ViTMAE decoder (trainable CLS
token, separate q/k/v, LayerNorm eps 1e-12, its own MLP width). The converter switches the
corresponding :class:`PAEConfig` fields on when the model offers them (``compressor_arch``,
``dam_final_norm``, ``sft_norm_affine``, ``dam_input_size``, ``decoder_arch``,
``decoder_mlp_ratio``, ``decoder_ln_eps``) and checks the built model's tensors either way.

Checkpoints without a DAM (``use_delta_encoder: false``) convert too: the SFT projection is set to
zero, so the fusion returns the VFM tokens exactly as the release does; the pixel branch keeps its
initial weights (unused while the SFT is zero). Converted models carry inference weights only:
their config has ``targets.mode: raw`` and ``scr_weight: 0`` (the release has no projector).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch

from manifold_lab.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from manifold_lab.errors import CheckpointError, ManifoldLabError
from manifold_lab.tokenizers.convert import CONVERTERS

STRIP_PREFIXES = ("module.", "_orig_mod.")
RELEASE_DEFAULTS = {
    "encoder": "dinov2_vitl14_reg",  # PAE_DINOv2L_d32.yaml: DINOv2-L with registers, final norm without affine
    "encoder_input_size": 224,
    "image_size": 256,
    "heads": 16,  # DINOv2-L heads: DAM and compressor/decompressor attention (num_heads=encoder.num_heads)
    "decoder_heads": 16,  # RAE's ViT-XL decoder config
    "decoder_ln_eps": 1e-12,  # HF ViTMAEConfig default, kept by RAE's decoder configs
}


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def read_release_state_dict(src: str | Path, state: str = "model") -> dict[str, torch.Tensor]:
    """The release's state dict from ``src`` (safetensors, or torch.load with weights_only=True).

    A ``{"model": ..., "ema": ...}`` checkpoint gives its ``state`` entry ("model", as the release's
    loader reads; "ema" when present); prefixes ``module.`` / ``_orig_mod.`` are removed.
    """
    path = Path(src)
    if not path.is_file():
        raise CheckpointError(f"PAE release checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from manifold_lab.io import load_tensors

        obj: Any = load_tensors(path)
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickles with non-tensor objects, truncated files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path} cannot be read with torch.load(weights_only=True) ({first[:160]}); if it is a trusted "
                "release file holding extra Python objects, re-save only its state dict: "
                "torch.save(torch.load(f, weights_only=False)['model'], 'pae_model.pt')") from exc
    if isinstance(obj, dict) and state in obj and isinstance(obj[state], dict):
        obj = obj[state]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        if state != "model":
            raise CheckpointError(f"{path} has no '{state}' entry (entries: {', '.join(map(str, obj))[:120]}); "
                                  "use state='model'")
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a PAE state dict (expected a mapping of tensor names to tensors, "
                              "or {'model': state_dict})")
    out = {}
    for key, value in obj.items():
        k = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = value
    return out


# ----------------------------------------------------------------------------------------------
# structure of a release checkpoint
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReleaseLayout:
    vfm_dim: int
    z_channels: int
    has_dam: bool
    dam_depth: int
    dam_cross: bool
    dam_patch: int
    dam_mlp: int
    dam_layerscale: bool
    fusion_mode: str
    decoder_width: int
    decoder_depth: int
    decoder_mlp: int
    decoder_patch: int
    num_patches: int
    compressor_qkv_bias: bool

    @property
    def grid(self) -> int:
        return int(round(math.sqrt(self.num_patches)))


def _need(sd: dict[str, torch.Tensor], key: str, ndim: int | None = None) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"not a PAE release checkpoint: key '{key}' is missing "
                              f"({len(sd)} keys, e.g. {', '.join(sorted(sd)[:3])})")
    t = sd[key]
    if ndim is not None and t.ndim != ndim:
        raise CheckpointError(f"PAE release checkpoint: '{key}' has shape {tuple(t.shape)}, expected {ndim} dims")
    return t


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    if idx and idx != set(range(len(idx))):
        raise CheckpointError(f"PAE release checkpoint: layers under '{prefix}' are not numbered 0..{len(idx) - 1}")
    return len(idx)


def inspect_release(sd: dict[str, torch.Tensor]) -> ReleaseLayout:
    """Widths, depths and switches of a release state dict, read from tensor shapes."""
    comp = _need(sd, "latent_compressor.1.weight", 4)
    c, d = int(comp.shape[0]), int(comp.shape[1])
    has_dam = any(k.startswith("delta_encoder.") for k in sd)
    dam_depth = _count(sd, "delta_encoder.layers.") if has_dam else 0
    fusion, dam_patch, dam_mlp, cross, ls = "none", 0, 0, False, False
    if has_dam:
        pe = _need(sd, "delta_encoder.patch_embed.proj.weight", 4)
        dam_patch = int(pe.shape[-1])
        if dam_depth:
            dam_mlp = int(_need(sd, "delta_encoder.layers.0.mlp.fc1.weight", 2).shape[0])
            cross = "delta_encoder.layers.0.cross_attn.q_proj.weight" in sd
            ls = "delta_encoder.layers.0.ls1.gamma" in sd
        fp = sd.get("delta_encoder.fusion_proj.weight")
        if fp is None:
            fusion = "none"
        elif tuple(fp.shape) == (2 * d, d):
            fusion = "sft"
        elif tuple(fp.shape) == (d, d):
            fusion = "add"
        elif tuple(fp.shape) == (d, 2 * d):
            fusion = "concat"
        else:
            raise CheckpointError(f"PAE release checkpoint: delta_encoder.fusion_proj.weight has shape "
                                  f"{tuple(fp.shape)}, which fits none of the release's fusion modes for D={d}")
    emb = _need(sd, "decoder.decoder_embed.weight", 2)
    pred = _need(sd, "decoder.decoder_pred.weight", 2)
    pix = int(pred.shape[0])
    p = int(round(math.sqrt(pix / 3)))
    if p * p * 3 != pix:
        raise CheckpointError(f"PAE release checkpoint: decoder.decoder_pred has {pix} outputs, not 3*p*p")
    pos = _need(sd, "decoder.decoder_pos_embed", 3)
    n = int(pos.shape[1]) - 1
    if int(round(math.sqrt(n))) ** 2 != n:
        raise CheckpointError(f"PAE release checkpoint: decoder.decoder_pos_embed has {n}+1 positions, "
                              "not a square grid")
    if int(emb.shape[1]) != d:
        raise CheckpointError(f"PAE release checkpoint: decoder_embed takes {emb.shape[1]} channels but the "
                              f"compressor works at D={d}; the file mixes two models")
    depth = _count(sd, "decoder.decoder_layers.")
    mlp = int(_need(sd, "decoder.decoder_layers.0.intermediate.dense.weight", 2).shape[0]) if depth else 0
    return ReleaseLayout(vfm_dim=d, z_channels=c, has_dam=has_dam, dam_depth=dam_depth, dam_cross=cross,
                         dam_patch=dam_patch, dam_mlp=dam_mlp, dam_layerscale=ls, fusion_mode=fusion,
                         decoder_width=int(emb.shape[0]), decoder_depth=depth, decoder_mlp=mlp, decoder_patch=p,
                         num_patches=n, compressor_qkv_bias="latent_compressor.0.qkv.bias" in sd)


# ----------------------------------------------------------------------------------------------
# small exact transforms
# ----------------------------------------------------------------------------------------------
def mae_sincos_table(dim: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table (N, dim): [sin x, cos x, sin y, cos y] (x = column), as the release builds it."""
    def one_d(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    return torch.cat([one_d(cols, dim // 2), one_d(rows, dim // 2)], dim=1).float()


def channel_permutation(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5) -> torch.Tensor | None:
    """``perm`` with ``ours[:, j] == theirs[:, perm[j]]`` for two (N, D) tables, or None if there is none."""
    if ours.shape != theirs.shape:
        return None
    o, t = ours.double(), theirs.double()
    dist = torch.cdist(o.T, t.T)  # (D, D): column j of ours vs column k of theirs
    perm = dist.argmin(dim=1)
    close = dist.gather(1, perm[:, None]) <= atol * math.sqrt(o.shape[0])
    if len(set(perm.tolist())) != perm.numel() or not bool(close.all()):
        return None
    return perm


def fold_input_normalization(weight: torch.Tensor, bias: torch.Tensor,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv that read ``(x01 - mean) / std`` rewritten to read ``x`` in [-1, 1] (x01 = (x + 1) / 2).

    Exact for a convolution without padding (the release's stride-q patch embedding)."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    w = weight.double()
    new_w = w / (2 * s)
    new_b = bias.double() + (w * ((0.5 - m) / s)).sum(dim=(1, 2, 3))
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


def fold_output_denormalization(weight: torch.Tensor, bias: torch.Tensor, channels: int = 3,
                                mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """A pixel head whose output ``o`` the release maps to ``o * std + mean`` in [0, 1], rewritten to
    predict [-1, 1] pixels directly: ``2 (o * std + mean) - 1``. Rows are ordered (p, q, c), c last
    (HF ViT-MAE ``unpatchify``, as :func:`manifold_lab.nn.vit.unpatchify`)."""
    rows = weight.shape[0]
    c = torch.arange(rows) % channels
    s = torch.tensor(std, dtype=torch.float64)[c]
    m = torch.tensor(mean, dtype=torch.float64)[c]
    new_w = weight.double() * (2 * s)[:, None]
    new_b = bias.double() * 2 * s + 2 * m - 1
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# mapping
# ----------------------------------------------------------------------------------------------
class _Mapper:
    """Collects target tensors, remembers which release keys were used, and reports gaps in one line."""

    def __init__(self, sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
        self.sd = sd
        self.expected = expected
        self.used: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise CheckpointError(f"PAE release checkpoint lacks '{key}' (truncated or another model's file)")
        self.used.add(key)
        return self.sd[key]

    def opt(self, key: str) -> torch.Tensor | None:
        return self.get(key) if key in self.sd else None

    def put(self, key: str, value: torch.Tensor) -> None:
        if key not in self.expected:
            raise CheckpointError(f"manifold-lab PAE has no tensor '{key}' for the release's weights; this PAE "
                                  "was built without the layout the release needs (see convert/pae.py)")
        if tuple(value.shape) != tuple(self.expected[key].shape):
            raise CheckpointError(f"release tensor for '{key}' has shape {tuple(value.shape)} but the model "
                                  f"expects {tuple(self.expected[key].shape)}; pass the matching heads/widths options")
        self.out[key] = value.detach().to(self.expected[key].dtype).clone()

    def has(self, key: str) -> bool:
        return key in self.expected

    def linear(self, src: str, dst: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, bias_optional: bool = False) -> None:
        w = self.get(src + ".weight")
        b = self.opt(src + ".bias") if bias_optional else self.get(src + ".bias")
        if cols is not None:
            w = w[:, cols]
        if scale is not None:  # LayerScale folded into the output
            w = w * scale[:, None]
            b = b * scale if b is not None else None
        if rows is not None:
            w = w[rows]
            b = b[rows] if b is not None else None
        self.put(dst + ".weight", w)
        if b is not None or self.has(dst + ".bias"):
            self.put(dst + ".bias", b if b is not None else torch.zeros(w.shape[0]))

    def norm(self, src: str, dst: str, perm: torch.Tensor | None = None) -> None:
        for part in ("weight", "bias"):
            t = self.get(f"{src}.{part}")
            self.put(f"{dst}.{part}", t[perm] if perm is not None else t)


def _require(expected: dict[str, torch.Tensor], key: str, what: str) -> None:
    if key not in expected:
        raise CheckpointError(f"cannot convert the PAE release exactly: {what}")


def map_release_state_dict(sd: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """Release state dict -> ``model.state_dict()`` layout (every model tensor produced, every release
    key used; one CheckpointError line otherwise)."""
    layout = inspect_release(sd)
    expected = dict(model.state_dict())
    m = _Mapper(sd, expected)

    # ---- DAM ------------------------------------------------------------------------------
    if layout.has_dam:
        if layout.fusion_mode != "sft":
            raise CheckpointError(f"PAE release checkpoint uses fusion_mode '{layout.fusion_mode}'; only the "
                                  "paper's SFT fusion is converted")
        if not layout.dam_cross and layout.dam_depth:
            raise CheckpointError("PAE release checkpoint has a DAM without cross-attention (delta_cross false); "
                                  "manifold-lab's DAM always cross-attends")
        _require(expected, "pixel.patch_embed.weight", "this PAE has no DAM pixel branch (fusion must be 'dam')")
        if any(k.startswith("pixel.norm.") for k in expected):
            raise CheckpointError("cannot convert the PAE release exactly: the release feeds the last DAM block "
                                  "straight into the SFT projection, this PAE applies a LayerNorm there "
                                  "(needs PAEConfig.dam_final_norm = false)")
        ours_patch = int(expected["pixel.patch_embed.weight"].shape[-1])
        if ours_patch != layout.dam_patch:
            raise CheckpointError(f"cannot convert the PAE release exactly: its DAM reads the image resized to the VFM "
                                  f"input size in {layout.dam_patch}-pixel patches, this PAE's DAM reads "
                                  f"{ours_patch}-pixel patches (needs PAEConfig.dam_input_size = the VFM input size)")
        perm = _dam_permutation(model, m.get("delta_encoder.pos_embed"))
        w, b = fold_input_normalization(m.get("delta_encoder.patch_embed.proj.weight"),
                                        m.get("delta_encoder.patch_embed.proj.bias"))
        m.put("pixel.patch_embed.weight", w[perm])
        m.put("pixel.patch_embed.bias", b[perm])
        for i in range(layout.dam_depth):
            s, t = f"delta_encoder.layers.{i}", f"pixel.blocks.{i}"
            ls = [m.opt(f"{s}.ls{j}.gamma") for j in (1, 2, 3)]
            m.norm(f"{s}.norm1", f"{t}.norm1", perm)
            m.linear(f"{s}.self_attn.qkv", f"{t}.attn.qkv", cols=perm)
            m.linear(f"{s}.self_attn.proj", f"{t}.attn.proj", rows=perm, scale=ls[0])
            m.norm(f"{s}.norm2_q", f"{t}.norm2", perm)
            m.norm(f"{s}.norm2_kv", f"{t}.norm_ctx")
            m.linear(f"{s}.cross_attn.q_proj", f"{t}.cross.q", cols=perm)
            kw, kb = m.get(f"{s}.cross_attn.k_proj.weight"), m.get(f"{s}.cross_attn.k_proj.bias")
            vw, vb = m.get(f"{s}.cross_attn.v_proj.weight"), m.get(f"{s}.cross_attn.v_proj.bias")
            m.put(f"{t}.cross.kv.weight", torch.cat([kw, vw]))
            m.put(f"{t}.cross.kv.bias", torch.cat([kb, vb]))
            m.linear(f"{s}.cross_attn.proj", f"{t}.cross.proj", rows=perm, scale=ls[1])
            m.norm(f"{s}.norm3", f"{t}.norm3", perm)
            m.linear(f"{s}.mlp.fc1", f"{t}.mlp.fc1", cols=perm)
            m.linear(f"{s}.mlp.fc2", f"{t}.mlp.fc2", rows=perm, scale=ls[2])
        m.linear("delta_encoder.fusion_proj", "sft", cols=perm)
        lw, lb = m.get("delta_encoder.final_ln.weight"), m.get("delta_encoder.final_ln.bias")
        if m.has("sft_norm.weight"):
            m.put("sft_norm.weight", lw)
            m.put("sft_norm.bias", lb)
        elif not (torch.equal(lw, torch.ones_like(lw)) and torch.equal(lb, torch.zeros_like(lb))):
            raise CheckpointError("cannot convert the PAE release exactly: its SFT LayerNorm (final_ln) has a "
                                  "trained affine, this PAE's fusion LayerNorm has none (needs "
                                  "PAEConfig.sft_norm_affine = true)")
    else:
        # no DAM in the release: H = F. A zero SFT makes manifold-lab's DAM return F exactly.
        _require(expected, "sft.weight", "this PAE has no SFT fusion to switch off (fusion must be 'dam')")
        m.put("sft.weight", torch.zeros_like(expected["sft.weight"]))
        m.put("sft.bias", torch.zeros_like(expected["sft.bias"]))

    # ---- compressor / decompressor --------------------------------------------------------------
    for src, dst in (("latent_compressor.0", "compressor.0"), ("latent_decompressor.1", "decompressor.0")):
        if f"{dst}.attn.qkv.weight" in expected or f"{dst}.qkv.weight" not in expected:
            raise CheckpointError("cannot convert the PAE release exactly: its compressor/decompressor is one bare "
                                  "attention layer (no LayerNorm, residual or MLP), this PAE builds transformer "
                                  "blocks (needs PAEConfig.compressor_arch = 'attention', depth 1)")
        m.linear(f"{src}.qkv", f"{dst}.qkv", bias_optional=True)  # timm Attention: qkv_bias=False
        m.linear(f"{src}.proj", f"{dst}.proj")
    m.linear("latent_compressor.1", "to_latent")
    m.linear("latent_decompressor.0", "from_latent")

    # ---- decoder --------------------------------------------------------------------------------
    if "decoder.cls_token" not in expected:
        raise CheckpointError("cannot convert the PAE release exactly: its decoder is RAE's ViT-MAE decoder with a "
                              "trainable CLS token, this PAE's ViTDecoder has none "
                              "(needs PAEConfig.decoder_arch = 'mae')")
    m.linear("decoder.decoder_embed", "decoder.embed")
    m.put("decoder.cls_token", m.get("decoder.trainable_cls_token"))
    pos = m.get("decoder.decoder_pos_embed")
    if m.has("decoder.pos_embed"):
        m.put("decoder.pos_embed", pos)
    else:
        _check_table(model.decoder.pos_embed, pos, "decoder position table")
    for i in range(layout.decoder_depth):
        s, t = f"decoder.decoder_layers.{i}", f"decoder.blocks.{i}"
        m.linear(f"{s}.attention.attention.query", f"{t}.q")
        m.linear(f"{s}.attention.attention.key", f"{t}.k")
        m.linear(f"{s}.attention.attention.value", f"{t}.v")
        m.linear(f"{s}.attention.output.dense", f"{t}.proj")
        m.norm(f"{s}.layernorm_before", f"{t}.norm1")
        m.norm(f"{s}.layernorm_after", f"{t}.norm2")
        m.linear(f"{s}.intermediate.dense", f"{t}.fc1")
        m.linear(f"{s}.output.dense", f"{t}.fc2")
    m.norm("decoder.decoder_norm", "decoder.norm")
    hw, hb = fold_output_denormalization(m.get("decoder.decoder_pred.weight"), m.get("decoder.decoder_pred.bias"))
    m.put("decoder.head.weight", hw)
    m.put("decoder.head.bias", hb)

    # ---- coverage -------------------------------------------------------------------------------
    skipped = {k for k in sd if k.startswith("encoder.")}
    unused = sorted(set(sd) - m.used - skipped)
    if unused:
        raise CheckpointError(f"PAE release checkpoint has {len(unused)} keys the converter does not know "
                              f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}); another version "
                              "of the release or another model")
    missing = [k for k in expected if k not in m.out]
    if not layout.has_dam:  # the unused pixel branch (and fusion norm) keeps its initial weights
        missing = [k for k in missing if not k.startswith(("pixel.", "sft_norm."))]
    if missing:
        raise CheckpointError(f"the release does not provide {len(missing)} tensors of this PAE "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); build it with "
                              "the release layout (see convert/pae.py)")
    for k in expected:
        m.out.setdefault(k, expected[k])
    return m.out


def _check_table(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    o = ours.reshape(-1, ours.shape[-1]).float()
    t = theirs.reshape(-1, theirs.shape[-1]).float()
    if o.shape != t.shape or not torch.allclose(o, t, atol=1e-5):
        raise CheckpointError(f"cannot convert the PAE release exactly: the {what} differs from the release's")


def _dam_permutation(model: Any, release_pos: torch.Tensor) -> torch.Tensor:
    """The channel permutation that maps the release's DAM stream onto ours (identity if the tables agree)."""
    ours = model.pixel.pos_embed.reshape(-1, model.pixel.pos_embed.shape[-1]).float()
    theirs = release_pos.reshape(-1, release_pos.shape[-1]).float()
    if ours.shape != theirs.shape:
        raise CheckpointError(f"PAE release DAM has {theirs.shape[0]} tokens of width {theirs.shape[1]}, this PAE's "
                              f"DAM {ours.shape[0]} of width {ours.shape[1]}; the DAM must run on the VFM grid at "
                              "the VFM width (dam_width null, dam_input_size = the VFM input size)")
    perm = channel_permutation(ours, theirs)
    if perm is None:
        raise CheckpointError("cannot convert the PAE release exactly: its DAM position table is not a channel "
                              "permutation of this PAE's sin-cos table")
    return perm


# ----------------------------------------------------------------------------------------------
# the converter
# ----------------------------------------------------------------------------------------------
def release_config(layout: ReleaseLayout, **options: Any) -> Any:
    """A PAEConfig that builds the release's architecture (where PAEConfig offers the switches)."""
    from manifold_lab.tokenizers.pae import PAEConfig

    heads = int(options.get("heads", RELEASE_DEFAULTS["heads"]))
    values: dict[str, Any] = {
        "image_size": int(options.get("image_size", layout.decoder_patch * layout.grid)),
        "encoder": options.get("encoder", RELEASE_DEFAULTS["encoder"]),
        "encoder_weights": options.get("encoder_weights"),
        "encoder_input_size": options.get("encoder_input_size", RELEASE_DEFAULTS["encoder_input_size"]),
        "final_norm_affine": False,
        "fusion": "dam",
        "dam_width": None,
        "dam_depth": layout.dam_depth if layout.has_dam else 0,
        "dam_heads": heads,
        "mlp_ratio": (layout.dam_mlp / layout.vfm_dim) if layout.dam_mlp else 4.0,
        "compressor_depth": 1,
        "decompressor_depth": 1,
        "block_heads": heads,
        "z_channels": layout.z_channels,
        "decoder_width": layout.decoder_width,
        "decoder_depth": layout.decoder_depth,
        "decoder_heads": int(options.get("decoder_heads", RELEASE_DEFAULTS["decoder_heads"])),
        "scr_weight": 0.0,
        "perceptual_weight": 0.0,
    }
    # release-layout switches, set when this PAEConfig has them (checked on the built model either way)
    switches = {
        "compressor_arch": "attention",
        "compressor_qkv_bias": layout.compressor_qkv_bias,
        "dam_final_norm": False,
        "sft_norm_affine": True,
        "dam_input_size": values["encoder_input_size"],
        "decoder_arch": "mae",
        "decoder_mlp_ratio": layout.decoder_mlp / layout.decoder_width if layout.decoder_width else 4.0,
        "decoder_ln_eps": float(options.get("decoder_ln_eps", RELEASE_DEFAULTS["decoder_ln_eps"])),
    }
    fields = {f.name for f in dataclasses.fields(PAEConfig)}
    values.update({k: v for k, v in switches.items() if k in fields})
    if "decoder_mlp_ratio" not in fields and layout.dam_mlp and \
            abs(layout.decoder_mlp / layout.decoder_width - layout.dam_mlp / layout.vfm_dim) > 1e-9:
        raise CheckpointError("cannot convert the PAE release exactly: its decoder MLP ratio "
                              f"({layout.decoder_mlp}/{layout.decoder_width}) differs from the DAM's and this PAE has "
                              "one mlp_ratio for both (needs PAEConfig.decoder_mlp_ratio)")
    cfg = PAEConfig(**{k: v for k, v in values.items() if k in fields})
    from manifold_lab.tokenizers.pae_targets import TargetConfig

    cfg.targets = TargetConfig(mode="raw")
    return cfg


@CONVERTERS.register("pae")
def convert(src: str | Path, **options: Any) -> Any:
    """Load the official PAE release checkpoint ``src`` into manifold-lab's PAE.

    Options: ``encoder`` (default dinov2_vitl14_reg), ``encoder_weights`` (a local file),
    ``encoder_input_size`` (224), ``image_size`` (decoder patch x grid = 256), ``heads`` (DAM and
    (de)compressor attention heads, 16 = DINOv2-L), ``decoder_heads`` (16), ``state`` ("model" or
    "ema"). The frozen VFM's own weights come from ``encoder_weights``, never from this file.
    """
    from manifold_lab.tokenizers.pae import PAE

    sd = read_release_state_dict(src, options.pop("state", "model"))
    layout = inspect_release(sd)
    cfg = release_config(layout, **options)
    try:
        model = PAE(cfg)
    except ManifoldLabError as exc:
        raise CheckpointError(f"cannot build the PAE the release describes ({exc})") from exc
    if tuple(model.grid) != (layout.grid, layout.grid):
        raise CheckpointError(f"PAE release decodes a {layout.grid}x{layout.grid} grid but encoder "
                              f"{cfg.encoder} gives {model.grid[0]}x{model.grid[1]}; pass encoder/encoder_input_size")
    if model.vfm_dim != layout.vfm_dim:
        raise CheckpointError(f"PAE release works at D={layout.vfm_dim} but encoder {cfg.encoder} gives "
                              f"D={model.vfm_dim}; pass the encoder the checkpoint was trained with")
    state = map_release_state_dict(sd, model)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


__all__ = ["convert", "read_release_state_dict", "inspect_release", "map_release_state_dict", "release_config",
           "ReleaseLayout", "mae_sincos_table", "channel_permutation", "fold_input_normalization",
           "fold_output_denormalization", "RELEASE_DEFAULTS"]
