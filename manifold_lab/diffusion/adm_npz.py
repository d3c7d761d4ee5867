"""Sample and reference files in the ADM format (openai/guided-diffusion), read without loading them whole.

The format every gFID number in the literature is computed from (ADM's ``evaluations/evaluator.py``,
LightningDiT's and RAE's sampling scripts write it):

* samples: an ``.npz`` with ``arr_0`` uint8 ``[N, H, W, 3]`` (NHWC, 0..255) and, for
  class-conditional samples, ``arr_1`` int64 labels ``[N]``;
* reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` reference images plus
  the TF-Inception pool3 statistics ``mu`` (2048,), ``sigma`` (2048, 2048) of the full reference
  set (and the spatial ``mu_s``/``sigma_s`` of sFID, not used here). ``mu``/``sigma`` are read as
  they are: they were computed from many more images than ``arr_0`` holds.

A 50k x 256 x 256 x 3 file is 9.8 GB of uint8 (40 GB as float), so arrays are never loaded whole
when avoidable: ``np.savez`` stores members uncompressed, so the array's bytes lie contiguously in
the zip and are opened with ``np.memmap`` (read-only, pages read on demand); callers convert one
batch at a time. Members of a compressed ``savez_compressed`` file cannot be mapped and are read
into memory (as uint8). Greyscale arrays (``NHW`` or ``NHW1``) are returned as a zero-copy
read-only 3-channel view (``np.broadcast_to``).

Quantisation (our choice, as LightningDiT's ``127.5 x + 128`` then truncate, i.e. round half up):
``[-1, 1] -> round((x + 1) * 127.5)``; ADM truncates ``(x + 1) * 127.5`` instead. Rounding is
what the FID backbones' own 8-bit quantisation does, so features of images written and read back
equal those of the images themselves.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manifold_lab.errors import ManifoldLabError
from manifold_lab.io import atomic_path

_LOCAL_HEADER = 30  # bytes of a zip local file header before the name and the extra field


def images_to_uint8(images: Any) -> np.ndarray:
    """Images ``(N, C, H, W)`` in [-1, 1] (tensor or array; C = 1 or 3) -> uint8 ``(N, H, W, 3)``.

    Values are clipped to [-1, 1] and rounded to the nearest of the 256 levels; grey is repeated to RGB.
    """
    t = images.detach() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ManifoldLabError(f"images_to_uint8 takes images (N, C, H, W) with C = 1 or 3 in [-1, 1], "
                               f"got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ManifoldLabError(f"images_to_uint8 takes float images in [-1, 1], got dtype {t.dtype}; "
                               "uint8 images are already quantised")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ManifoldLabError(f"images_to_uint8: the images contain {bad} NaN/inf values; the generator is broken")
    u8 = ((t.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    return u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def uint8_to_images(images: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` (or grey ``(N, H, W)`` / ``(N, H, W, 1)``) -> float32 ``(N, 3, H, W)`` in [-1, 1].

    The conversion runs on ``device`` (uint8 is moved there first: 4x less to transfer).
    """
    if isinstance(images, torch.Tensor):
        t = images.detach()
    else:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ManifoldLabError(f"uint8_to_images takes uint8 NHWC images, got dtype {arr.dtype}")
        # a memory map / broadcast view is read-only: copy the batch (torch wants writable memory)
        t = torch.from_numpy(np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr))
    if t.dtype != torch.uint8:
        raise ManifoldLabError(f"uint8_to_images takes uint8 NHWC images, got dtype {t.dtype}")
    if t.ndim == 3:
        t = t[..., None]
    if t.ndim != 4 or t.shape[-1] not in (1, 3):
        raise ManifoldLabError(f"uint8_to_images takes images (N, H, W, 3) or greyscale (N, H, W[, 1]), "
                               f"got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    x = t.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


def write_samples_npz(path: str | os.PathLike, images_uint8_nhwc: Any, labels: Any = None) -> Path:
    """Write ``arr_0`` (uint8 ``[N, H, W, 3]``) and, when given, ``arr_1`` (int64 ``[N]``) atomically.

    The file is stored uncompressed (``np.savez``), as ADM's, so readers can memory-map it.
    """
    path = Path(path)
    arr = images_uint8_nhwc.detach().cpu().numpy() if isinstance(images_uint8_nhwc, torch.Tensor) \
        else np.asarray(images_uint8_nhwc)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ManifoldLabError(f"write_samples_npz takes uint8 images [N, H, W, 3], got {arr.dtype} "
                               f"{tuple(arr.shape)}; convert [-1, 1] images with images_to_uint8")
    members = {"arr_0": arr}
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.ndim != 1 or lab.shape[0] != arr.shape[0] or lab.dtype.kind not in "iu":
            raise ManifoldLabError(f"write_samples_npz: labels must be {arr.shape[0]} integers (one per image), "
                                   f"got {lab.dtype} {tuple(lab.shape)}")
        members["arr_1"] = lab.astype(np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
            np.savez(fh, **members)
    return path


def npz_keys(path: str | os.PathLike) -> list[str]:
    """The array names in an ``.npz`` (without opening any array); a missing/foreign file is one error line."""
    path = Path(path)
    if not path.is_file():
        raise ManifoldLabError(f"npz file not found: {path}; check the path")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ManifoldLabError(f"{path} is not a readable .npz file ({type(exc).__name__}); "
                               "pass an ADM-format npz (np.savez)") from exc
    return [n[:-4] for n in names if n.endswith(".npy")]


def open_npz_array(path: str | os.PathLike, key: str) -> np.ndarray:
    """Member ``key`` of an ``.npz``: a read-only ``np.memmap`` when stored uncompressed, else loaded."""
    path = Path(path)
    if key not in npz_keys(path):
        raise ManifoldLabError(f"{path} has no array '{key}' (it holds {', '.join(npz_keys(path)) or 'nothing'})")
    mapped = _memmap_member(path, key)
    if mapped is not None:
        return mapped
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[key]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise ManifoldLabError(f"cannot read array '{key}' of {path} ({type(exc).__name__}: {first}); "
                               "re-create the file") from exc


def _memmap_member(path: Path, key: str) -> np.ndarray | None:
    """The array of an uncompressed member mapped in place, or None when it cannot be mapped."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(_LOCAL_HEADER)
            if len(local) != _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            fh.seek(info.header_offset + _LOCAL_HEADER + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                return None
            offset = fh.tell()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, struct.error):
        return None
    if dtype.hasobject:
        return None
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")


def _as_rgb_nhwc(arr: np.ndarray, what: str) -> np.ndarray:
    """Check uint8 NHWC (C = 3) or greyscale NHW / NHW1; grey becomes a read-only 3-channel view."""
    if arr.dtype != np.uint8:
        raise ManifoldLabError(f"{what} must be uint8 images [N, H, W, 3] (ADM format), got dtype {arr.dtype}; "
                               "convert [-1, 1] images with images_to_uint8")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        hint = " (it looks channel-first: ADM files are NHWC)" if arr.ndim == 4 and arr.shape[1] in (1, 3) else ""
        raise ManifoldLabError(f"{what} must be uint8 images [N, H, W, 3] or greyscale [N, H, W], "
                               f"got shape {tuple(arr.shape)}{hint}")
    if arr.shape[-1] == 1:
        arr = np.broadcast_to(arr, (*arr.shape[:3], 3))
    return arr


def read_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 ``[N, H, W, 3]`` images, int64 labels ``[N]`` or None) of an ADM sample file.

    The images are a read-only memory map (or view) when possible: slice them batch by batch.
    """
    path = Path(path)
    images = _as_rgb_nhwc(open_npz_array(path, "arr_0"), f"arr_0 of {path}")
    labels = None
    if "arr_1" in npz_keys(path):
        lab = np.asarray(open_npz_array(path, "arr_1"))
        if lab.ndim != 1 or lab.shape[0] != images.shape[0] or lab.dtype.kind not in "iu":
            raise ManifoldLabError(f"arr_1 of {path} must be {images.shape[0]} integer labels, got "
                                   f"{lab.dtype} {tuple(lab.shape)}")
        labels = lab.astype(np.int64)
    return images, labels


def read_reference_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parts of an ADM reference batch that are present: ``mu``, ``sigma`` (float64, as stored), ``arr_0``.

    ``arr_0`` is checked like samples (and memory-mapped); ``mu``/``sigma`` must come together and
    have matching sizes.
    """
    path = Path(path)
    keys = npz_keys(path)
    out: dict[str, np.ndarray] = {}
    if ("mu" in keys) != ("sigma" in keys):
        raise ManifoldLabError(f"{path} holds only one of mu / sigma; a reference needs both (or images in arr_0)")
    if "mu" in keys:
        mu = np.array(open_npz_array(path, "mu"), dtype=np.float64)  # copies: small, and writable
        sigma = np.array(open_npz_array(path, "sigma"), dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ManifoldLabError(f"{path}: mu must be (F,) and sigma (F, F), got {mu.shape} and {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ManifoldLabError(f"{path}: mu / sigma contain NaN/inf values; the reference file is broken")
        out["mu"], out["sigma"] = mu, sigma
    if "arr_0" in keys:
        out["arr_0"] = _as_rgb_nhwc(open_npz_array(path, "arr_0"), f"arr_0 of {path}")
    if not out:
        raise ManifoldLabError(f"{path} holds neither mu/sigma nor images (arr_0); it is not an ADM reference batch")
    return out


__all__ = ["images_to_uint8", "npz_keys", "open_npz_array", "read_reference_npz", "read_samples_npz",
           "uint8_to_images", "write_samples_npz"]
