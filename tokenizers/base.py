"""What every tokenizer offers, and the shared machinery for the ones that live in this package.

A tokenizer maps images (B,3,H,W) in [-1, 1] to latents (B,C,h,w) and back. Metrics, the
diffusion model and studies only ever talk to the :class:`Tokenizer` protocol, so a third-party
tokenizer needs nothing from this package but those methods. :class:`TokenizerBase` adds what the
built-in ones share: input validation with one-line errors, latent statistics that travel with
the weights, and a checkpoint folder format that :func:`load_tokenizer` reads back bit-exactly.

Checkpoint folder format (written by :meth:`TokenizerBase.save`)::

    <folder>/model.safetensors   the module's state dict, plus the latent statistics under the
                                 reserved prefix ``__latent_stats__.`` (``mean`` and ``std``,
                                 float32 [C]); these tensors are the authoritative copy
    <folder>/config.json         {"format", "format_version", "tokenizer" (registry name),
                                  "config" (the config dataclass as a dict), "image_size",
                                  "latent_shape", "latent_stats" {"how", "mean", "std"} (a readable
                                  copy), "manifold_lab_version"}

``config.json`` is written last, so a folder without it is an unfinished save.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import torch
from torch import nn

from manifold_lab.config import from_dict, to_dict
from manifold_lab.errors import CheckpointError, ConfigError, ManifoldLabError
from manifold_lab.io import load_tensors, save_tensors, write_json

#: Prefix of the latent-statistics tensors inside ``model.safetensors`` (never a module key).
STATS_PREFIX = "__latent_stats__."
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "manifold-lab-tokenizer"
FORMAT_VERSION = 1


@dataclass
class LatentStats:
    """Per-channel latent statistics and a one-line note on how and on what they were computed.

    A diffusion model trains on ``normalize(z)``; carrying the statistics with the tokenizer means
    nobody downstream has to guess a scale factor.
    """

    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C], > 0
    how: str

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean).detach().to("cpu", torch.float32).reshape(-1)
        self.std = torch.as_tensor(self.std).detach().to("cpu", torch.float32).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ManifoldLabError(
                f"latent stats: mean has {self.mean.numel()} channels but std has {self.std.numel()}; "
                "pass one value per latent channel for both"
            )
        if not bool(torch.isfinite(self.mean).all()) or not bool((self.std > 0).all()) \
                or not bool(torch.isfinite(self.std).all()):
            raise ManifoldLabError("latent stats: mean must be finite and std finite and > 0 in every channel")
        if "\n" in self.how:
            raise ManifoldLabError("latent stats: 'how' must be a single line")

    @classmethod
    def from_latents(cls, batches: Iterable[torch.Tensor], how: str) -> "LatentStats":
        """Per-channel mean/std of (B,C,h,w) latent batches, summed in float64 so 10k+ latents lose no precision.

        A dead channel gets std 1e-6 instead of 0, so normalize() never divides by zero.
        """
        total = sq = None
        count = 0
        for z in batches:
            per_channel = z.detach().double().transpose(0, 1).flatten(1)  # (C, B*h*w)
            s, s2 = per_channel.sum(1), per_channel.pow(2).sum(1)
            total = s if total is None else total + s
            sq = s2 if sq is None else sq + s2
            count += per_channel.shape[1]
        if total is None or count == 0:
            raise ManifoldLabError("latent statistics need at least one latent; got none")
        mean = total / count
        std = (sq / count - mean.pow(2)).clamp_min(0.0).sqrt().clamp_min(1e-6)
        return cls(mean.float().cpu(), std.float().cpu(), how)

    @classmethod
    def identity(cls, channels: int, how: str = "identity (mean 0, std 1): statistics not computed yet") -> "LatentStats":
        """Statistics that make normalize/denormalize the identity (before any are computed)."""
        return cls(torch.zeros(channels), torch.ones(channels), how)

    @property
    def channels(self) -> int:
        return int(self.mean.numel())

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._view(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._view(z)
        return z * std + mean

    def _view(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim < 2 or z.shape[1] != self.channels:
            raise ManifoldLabError(
                f"latent stats have {self.channels} channels, got latents of shape {tuple(z.shape)}; "
                "pass (B,C,h,w) latents from the same tokenizer"
            )
        shape = (1, -1) + (1,) * (z.ndim - 2)
        dtype = z.dtype if z.is_floating_point() else torch.float32
        return (self.mean.to(z.device, dtype).view(shape), self.std.to(z.device, dtype).view(shape))

    def to_json(self) -> dict[str, Any]:
        return {"how": self.how, "mean": self.mean.tolist(), "std": self.std.tolist()}


@runtime_checkable
class Tokenizer(Protocol):
    """The interface every metric, trainer and study relies on.

    ``encode`` is deterministic (a VAE returns its posterior mean) and returns the raw,
    un-normalised latent; ``normalize``/``denormalize`` apply ``latent_stats``.
    """

    name: str
    image_size: int
    config: Any

    @property
    def latent_shape(self) -> tuple[int, int, int]: ...  # (C, h, w) for image_size inputs

    @property
    def latent_stats(self) -> LatentStats: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def normalize(self, z: torch.Tensor) -> torch.Tensor: ...

    def denormalize(self, z: torch.Tensor) -> torch.Tensor: ...

    def supports_resolution(self, size: int) -> bool: ...

    def save(self, path: str | Path) -> None: ...


@runtime_checkable
class HasReferenceMaps(Protocol):
    """Optional: spatial feature maps a tokenizer is built on or aligned to, for comparison with its latent.

    ``reference_maps(x)`` returns named maps (B, D, h', w') for images ``x``, e.g. the frozen VFM
    features and a regulariser's target. ``measure`` scores each map's SSC next to the latent's, so
    a researcher can see whether a regulariser pulls the latent towards a more or a less
    segment-coherent target (the PAE pilot's SSR sweep lowered SSC because its MobileNetV2 target
    was the less coherent one). A tokenizer without the method is measured as before.
    """

    def reference_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TokenizerBase(nn.Module, ABC):
    """Shared parts of the built-in tokenizers.

    Subclasses set ``name`` (their registry name), call ``super().__init__(config, image_size,
    in_channels, z_channels, downsample)`` and implement ``_encode`` and ``_decode`` (and may
    narrow ``supports_resolution``). ``encode``/``decode`` validate shapes first so that a wrong input
    fails with one readable line rather than a convolution error deep inside the network.
    They do not switch off autograd: wrap calls in ``torch.no_grad()`` when measuring.
    """

    name: str = "tokenizer"

    def __init__(self, config: Any, image_size: int, in_channels: int, z_channels: int, downsample: int) -> None:
        super().__init__()
        self.config = config
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.z_channels = int(z_channels)
        self.downsample = int(downsample)  # spatial factor between image and latent sides
        if not self.supports_resolution(self.image_size):
            raise ConfigError(
                f"{self.name}: image_size {self.image_size} is not supported ({self.resolution_rule()}); "
                "change image_size in the model config"
            )
        # Non-persistent buffers: they follow .to(device) but stay out of state_dict(), so training
        # checkpoints and EMA copies never depend on them; save() stores them under STATS_PREFIX.
        self.register_buffer("_stats_mean", torch.zeros(self.z_channels), persistent=False)
        self.register_buffer("_stats_std", torch.ones(self.z_channels), persistent=False)
        self._stats_how = LatentStats.identity(self.z_channels).how
        self.__dict__["_frozen"] = {}  # name -> frozen module, hidden from state_dict/parameters/DDP

    # ----- frozen networks (VFM encoders) kept out of checkpoints --------------------------------
    def attach_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Hold a frozen network (a VFM encoder) without making it part of the tokenizer's state.

        Its weights stay out of ``state_dict()``/``parameters()`` (so checkpoints, EMA averaging, the
        optimizer and DDP never see a 300M-parameter DINOv2), yet ``.to()``/``.float()`` move it with
        the tokenizer. It is rebuilt from its own weights file when the tokenizer is built, and
        :class:`~manifold_lab.encoders.FrozenEncoder` deep-copies to itself, so an EMA copy shares it.
        Record in the config what identifies it (encoder name; weights file) so loading rebuilds it.
        """
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        self.__dict__["_frozen"][name] = module
        return module

    def frozen(self, name: str) -> nn.Module:
        return self.__dict__["_frozen"][name]

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - nn.Module hook behind .to()/.cuda()/.float()
        super()._apply(fn, recurse)
        for module in self.__dict__.get("_frozen", {}).values():
            module._apply(fn)
        return self

    def last_layer(self) -> nn.Parameter:
        """The decoder's output layer weight, where adaptive loss weights (GAN) compare gradient norms."""
        raise NotImplementedError(f"{self.name}: last_layer() is not defined; adaptive GAN weighting needs it")

    # ----- to be provided by subclasses --------------------------------------------------------
    @abstractmethod
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Validated images -> raw latents (deterministic)."""

    @abstractmethod
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Validated raw latents -> images."""

    def latent_size(self, size: int) -> int:
        """Spatial side of the latent for a ``size`` x ``size`` image."""
        return int(size) // self.downsample

    def supports_resolution(self, size: int) -> bool:
        """Image sides the network maps without cropping: multiples of the downsampling factor."""
        return int(size) > 0 and int(size) % self.downsample == 0

    def resolution_rule(self) -> str:
        """Human-readable rule behind :meth:`supports_resolution`, used in error messages."""
        return f"H and W multiples of {self.downsample}"

    # ----- shape information -----------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.latent_size(self.image_size)
        return (self.z_channels, s, s)

    # ----- validated encode / decode ---------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [-1, 1] -> raw latents (B,C,h,w), deterministically."""
        self.check_images(x)
        return self._encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B,C,h,w) -> images (B,3,H,W), roughly in [-1, 1] (not clamped)."""
        self.check_latents(z)
        return self._decode(z)

    def check_images(self, x: torch.Tensor) -> None:
        ok = (isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] == self.in_channels
              and x.is_floating_point() and self.supports_resolution(int(x.shape[2]))
              and self.supports_resolution(int(x.shape[3])))
        if not ok:
            got = _describe(x)
            s = self.image_size
            raise ManifoldLabError(
                f"{self.name}: expects (B,{self.in_channels},{s},{s}) float images in [-1,1] "
                f"(other sizes: {self.resolution_rule()}), got {got}"
            )

    def check_latents(self, z: torch.Tensor) -> None:
        f = self.downsample
        ok = (isinstance(z, torch.Tensor) and z.ndim == 4 and z.shape[1] == self.z_channels
              and z.is_floating_point() and self.supports_resolution(int(z.shape[2]) * f)
              and self.supports_resolution(int(z.shape[3]) * f))
        if not ok:
            c, h, w = self.latent_shape
            raise ManifoldLabError(
                f"{self.name}: decode expects (B,{c},{h},{w}) float latents (from encode), got {_describe(z)}"
            )

    # ----- latent statistics -----------------------------------------------------------------
    @property
    def latent_stats(self) -> LatentStats:
        return LatentStats(self._stats_mean.detach().cpu(), self._stats_std.detach().cpu(), self._stats_how)

    def set_latent_stats(self, stats: LatentStats) -> None:
        if stats.channels != self.z_channels:
            raise ManifoldLabError(
                f"{self.name}: latent stats have {stats.channels} channels but the latent has "
                f"{self.z_channels}; compute them on this tokenizer's latents"
            )
        with torch.no_grad():
            self._stats_mean.copy_(stats.mean.to(self._stats_mean.device))
            self._stats_std.copy_(stats.std.to(self._stats_std.device))
        self._stats_how = stats.how

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> zero-mean, unit-std per channel (what a diffusion model trains on)."""
        return (z - self._stats_mean.to(z.dtype).view(1, -1, 1, 1)) / self._stats_std.to(z.dtype).view(1, -1, 1, 1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        return z * self._stats_std.to(z.dtype).view(1, -1, 1, 1) + self._stats_mean.to(z.dtype).view(1, -1, 1, 1)

    # ----- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the checkpoint folder described in the module docstring (each file atomically)."""
        from manifold_lab import __version__

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = dict(self.state_dict())
        tensors[STATS_PREFIX + "mean"] = self._stats_mean
        tensors[STATS_PREFIX + "std"] = self._stats_std
        save_tensors(folder / WEIGHTS_FILE, tensors, metadata={"format": FORMAT_NAME, "tokenizer": self.name})
        write_json(folder / CONFIG_FILE, {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tokenizer": self.name,
            "config": to_dict(self.config),
            "image_size": self.image_size,
            "latent_shape": list(self.latent_shape),
            "latent_stats": self.latent_stats.to_json(),
            "manifold_lab_version": __version__,
        })


class FixedGridTokenizer(TokenizerBase):
    """A tokenizer built on a frozen encoder's token grid (RAE, SVG, PAE): exactly one image size in,
    exactly one latent shape (C, h, w) out, since the VFM grid and the decoder's patch grid are fixed.

    Subclasses set ``grid_note`` (why the size is fixed) for the error messages.
    """

    grid_note: str = "the frozen encoder's fixed token grid"

    @staticmethod
    def grid_patch(name: str, image_size: int, grid: tuple[int, int], what: str = "the encoder's token grid") -> int:
        """Pixels per token side for ``image_size`` images on a square ``grid``; a ConfigError line otherwise."""
        gh, gw = int(grid[0]), int(grid[1])
        if gh != gw or int(image_size) % gh:
            raise ConfigError(f"{name}: image_size {image_size} is not a multiple of {what} {gh}x{gw}; "
                              "pick image_size = grid * patch (or another encoder_input_size)")
        return int(image_size) // gh

    def supports_resolution(self, size: int) -> bool:
        return int(size) == self.image_size

    def resolution_rule(self) -> str:
        return f"only {self.image_size}x{self.image_size} ({self.grid_note})"

    def check_latents(self, z: torch.Tensor) -> None:
        ok = (isinstance(z, torch.Tensor) and z.ndim == 4 and tuple(z.shape[1:]) == self.latent_shape
              and z.is_floating_point())
        if not ok:
            c, h, w = self.latent_shape
            raise ManifoldLabError(
                f"{self.name}: decode expects (B,{c},{h},{w}) float latents (from encode), got {_describe(z)}"
            )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        kind = "" if x.is_floating_point() else f" {str(x.dtype).replace('torch.', '')}"
        return "(" + ",".join(str(d) for d in x.shape) + ")" + kind
    return type(x).__name__


def load_tokenizer(path: str | Path, device: str | torch.device | None = None) -> TokenizerBase:
    """Rebuild a tokenizer saved with :meth:`TokenizerBase.save` (``path``: the folder or its
    ``model.safetensors``). Every failure is one :class:`CheckpointError` line naming the file."""
    from manifold_lab.tokenizers.registry import get_spec

    path = Path(path)
    is_file_arg = path.suffix == ".safetensors" or path.name == CONFIG_FILE
    folder = path.parent if is_file_arg else path
    weights, cfg_file = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if path.suffix == ".safetensors":
        weights = path
    if not folder.exists():
        raise CheckpointError(
            f"tokenizer checkpoint not found: {folder}; pass a folder written by Tokenizer.save "
            "(holding model.safetensors and config.json)"
        )
    for f in (weights, cfg_file):
        if not f.is_file():
            raise CheckpointError(
                f"tokenizer checkpoint {folder} has no {f.name}; it is incomplete or not a tokenizer "
                "checkpoint: save it again with Tokenizer.save"
            )
    try:
        meta = json.loads(cfg_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("top level is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{cfg_file} is not valid JSON ({str(exc).splitlines()[0]}); save the tokenizer again"
        ) from exc
    name = meta.get("tokenizer")
    if not isinstance(name, str) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"{cfg_file} lacks the 'tokenizer' name or the 'config' mapping; it was not written by "
            "Tokenizer.save: save the tokenizer again"
        )
    try:
        spec = get_spec(name)
    except ManifoldLabError as exc:
        raise CheckpointError(
            f"{cfg_file} names tokenizer '{name}', which is not available ({exc}); install the package "
            "that provides it"
        ) from exc
    try:
        config = from_dict(spec.config_cls, meta["config"], where="config")
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_file} has a config that '{name}' does not accept: {exc}") from exc
    model = spec.build(config)
    if not isinstance(model, TokenizerBase):
        raise CheckpointError(
            f"{cfg_file}: tokenizer '{name}' does not use the manifold-lab checkpoint format; "
            "load it the way its package documents"
        )
    tensors = load_tensors(weights)
    stats = {k[len(STATS_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(STATS_PREFIX)}
    _check_state(weights, name, model.state_dict(), tensors)
    if set(stats) != {"mean", "std"} or any(t.shape != (model.z_channels,) for t in stats.values()):
        raise CheckpointError(
            f"{weights} lacks valid latent statistics ({STATS_PREFIX}mean/std of shape "
            f"[{model.z_channels}]); save the tokenizer again"
        )
    model.load_state_dict(tensors, strict=True)
    how = (meta.get("latent_stats") or {}).get("how", "loaded from checkpoint (origin not recorded)")
    model.set_latent_stats(LatentStats(stats["mean"], stats["std"], str(how)))
    recorded = meta.get("latent_shape")
    if recorded is not None and list(recorded) != list(model.latent_shape):
        raise CheckpointError(
            f"{cfg_file} records latent_shape {tuple(recorded)} but its config builds "
            f"{model.latent_shape}; the file was edited or written by another version: save it again"
        )
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _check_state(file: Path, name: str, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Strict key and shape comparison, reported in one line (the first few offenders)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"{k} {tuple(got[k].shape)} in file vs {tuple(expected[k].shape)} in model"
        for k in sorted(set(expected) & set(got)) if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:3]) + (f", ... (+{len(items) - 3})" if len(items) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"{file} does not match tokenizer '{name}' as its config.json describes it "
            f"({'; '.join(problems)}); use the config.json saved with these weights"
        )
