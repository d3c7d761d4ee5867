"""Any folder of photos in the ImageNet layout, optionally with per-pixel instance masks.

Layout: ``root/<class name>/**/<image>``; classes are the sorted names of the subfolders that hold
at least one image, labels their positions in that list. A folder with images but no class
subfolders is read as one class named after the folder. Images of any resolution go through the
ADM preprocessing (:func:`manifold_lab.data.transforms.center_crop_arr`).

Masks (for SSC on real photos, e.g. COCO-panoptic PNGs): ``masks_root/<same relative path>.png``.
A single-channel PNG (L, P, I, I;16) holds the instance id per pixel; an RGB(A) PNG holds a
COCO-panoptic id ``R + 256 G + 256^2 B``. Ids are kept as they are (0 is background / void in both
conventions). Masks follow the image's geometry exactly, with NEAREST sampling.

Every problem is one :class:`DataError` line naming the file: missing folder, no images (listing
the accepted extensions), unreadable image, missing mask, mask of another size than its image.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from manifold_lab.data.transforms import center_crop_arr, center_crop_mask, pil_to_tensor_pm1
from manifold_lab.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); remove or replace the file") from exc


def read_mask(path: Path) -> np.ndarray:
    """An id mask (H, W) int64 from a PNG: single channel = ids; RGB(A) = R + 256 G + 256^2 B."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read mask {path} ({type(exc).__name__}: {exc}); remove or replace the file") from exc
    if mode in ("RGB", "RGBA"):
        rgb = arr[..., :3].astype(np.int64)
        return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    if arr.ndim == 3:  # e.g. LA: the first channel carries the ids
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"mask {path} has mode {mode} and shape {arr.shape}; save it as a single-channel or RGB PNG")
    return arr.astype(np.int64)


class ImageFolder(Dataset):
    """Items ``(image [3,S,S] in [-1,1], label)`` or, with ``masks_root``, ``(image, mask [S,S], label)``."""

    def __init__(self, root: str | os.PathLike, image_size: int, masks_root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        if self.image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        if not self.root.is_dir():
            raise DataError(
                f"image folder {self.root} does not exist; pass a folder with one subfolder of images per class"
            )
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [(d.name, _images_under(d)) for d in class_dirs]
        per_class = [(n, files) for n, files in per_class if files]
        if not per_class:
            top = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if top:
                per_class = [(self.root.name, top)]
        if not per_class:
            raise DataError(
                f"no images in {self.root} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}); "
                "use one subfolder of images per class"
            )
        self.classes = [n for n, _ in per_class]
        self.samples: list[tuple[Path, int]] = [(p, label) for label, (_, files) in enumerate(per_class) for p in files]
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.masks_root = Path(masks_root).expanduser() if masks_root is not None else None
        if self.masks_root is not None and not self.masks_root.is_dir():
            raise DataError(f"mask folder {self.masks_root} does not exist; pass the folder that mirrors {self.root}")
        self.has_masks = self.masks_root is not None
        self.name = f"folder:{self.root.name}"
        self._cache_key: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def mask_path(self, image_path: Path) -> Path:
        assert self.masks_root is not None
        return (self.masks_root / image_path.relative_to(self.root)).with_suffix(".png")

    @property
    def cache_key(self) -> str:
        """Folder, file list (relative paths, sizes, mtimes) and size: changes whenever the data does."""
        if self._cache_key is None:
            digest = hashlib.sha256()
            for path, label in self.samples:
                st = path.stat()
                digest.update(f"{path.relative_to(self.root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            masks = f"|masks={self.masks_root}" if self.masks_root else ""
            self._cache_key = (f"folder:{self.root.resolve()}{masks}|n{len(self)}|{digest.hexdigest()[:16]}"
                               f"@{self.image_size}")
        return self._cache_key

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = _open_image(path)
        image = pil_to_tensor_pm1(center_crop_arr(img, self.image_size))
        if self.masks_root is None:
            return image, label
        mpath = self.mask_path(path)
        if not mpath.is_file():
            raise DataError(f"mask {mpath} for image {path} is missing; add it or drop masks_root")
        mask = read_mask(mpath)
        if (mask.shape[1], mask.shape[0]) != img.size:
            raise DataError(
                f"mask {mpath} is {mask.shape[1]}x{mask.shape[0]} but image {path} is {img.size[0]}x{img.size[1]}; "
                "masks must have their image's size"
            )
        return image, torch.from_numpy(center_crop_mask(mask, self.image_size)), label

    def __repr__(self) -> str:
        return (f"ImageFolder(root={str(self.root)!r}, image_size={self.image_size}, n={len(self)}, "
                f"classes={len(self.classes)})")


def check_resolution(image_size: int, supported: Callable[[int], bool] | Iterable[int], tokenizer_name: str,
                     description: str | None = None) -> None:
    """Raise one DataError line if a tokenizer cannot take ``image_size`` x ``image_size`` images.

    ``supported`` is a set of sizes or a predicate; for a predicate, ``description`` (or its
    docstring's first line) says what it accepts, e.g. "multiples of 16".
    """
    if callable(supported):
        ok = bool(supported(image_size))
        what = description or ((supported.__doc__ or "").strip().splitlines() or ["other sizes"])[0]
    else:
        sizes = sorted({int(s) for s in supported})
        ok = image_size in sizes
        what = description or (", ".join(f"{s}x{s}" for s in sizes) if sizes else "no size")
    if not ok:
        raise DataError(f"tokenizer {tokenizer_name} cannot take {image_size}x{image_size} images; it supports {what}")
