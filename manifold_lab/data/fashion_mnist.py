"""Real Fashion-MNIST (60k train / 10k test, 10 classes), read from files already on the machine.

The idx files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``), or from torchvision's standard download folder
(``<root>/FashionMNIST/raw/``, gzipped or not; ``root`` defaults to ``~/.cache/torchvision``).
An explicit ``root`` is searched first. Nothing is downloaded.

The idx format is parsed here with numpy (a 4-byte big-endian magic number 0x0000080D where D is
the number of dimensions, then D big-endian uint32 sizes, then uint8 data), so a truncated or
foreign file fails with one line naming it. The uint8 array (47 MB for the training split) is kept
in memory, shared between dataset objects, and converted per item: 28 -> 32 by padding 2 px of
background (exact pixels), other sizes by antialiased bilinear resize, grey replicated to RGB.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from manifold_lab.data.transforms import grey28_to_image
from manifold_lab.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}


def _candidate_dirs(root: str | os.PathLike | None) -> list[Path]:
    torchvision_root = Path(root).expanduser() if root is not None else Path("~/.cache/torchvision").expanduser()
    tv_raw = torchvision_root / "FashionMNIST" / "raw"
    return [tv_raw, DEBIAN_DIR] if root is not None else [DEBIAN_DIR, tv_raw]


def find_files(split: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(images file, labels file) for a split, searched in the folders the module docstring names."""
    prefix = _PREFIX[split]
    for folder in _candidate_dirs(root):
        found = []
        for kind in ("images-idx3", "labels-idx1"):
            stem = folder / f"{prefix}-{kind}-ubyte"
            hit = next((p for p in (stem.with_name(stem.name + ".gz"), stem) if p.is_file()), None)
            found.append(hit)
        if all(found):
            return found[0], found[1]
    places = " or ".join(str(d) for d in _candidate_dirs(root))
    raise DataError(
        f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
        f"not found in {places}; run `apt-get install dataset-fashion-mnist` or put torchvision's download there"
    )


@lru_cache(maxsize=8)
def read_idx(path: str) -> np.ndarray:
    """Parse one idx file (optionally gzipped) into a uint8 array; a corrupt file raises DataError."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as fh:
            data = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"cannot read idx file {path} ({type(exc).__name__}: {exc}); re-install or re-download it"
        ) from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DataError(
            f"{path} is not a uint8 idx file (bad magic number {data[:4].hex()}); re-install or re-download it"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (header of {len(data)} bytes); re-install or re-download it")
    shape = tuple(int(x) for x in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(
            f"{path} holds {len(data) - header} data bytes but its header says {shape} ({expected}); "
            "the file is truncated or corrupt, re-install or re-download it"
        )
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    arr.setflags(write=False)
    return arr


def load_split(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and labels (N,) of a split."""
    if split not in _PREFIX:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got '{split}'")
    img_path, lab_path = find_files(split, root)
    images, labels = read_idx(str(img_path)), read_idx(str(lab_path))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST files disagree: {img_path} has shape {images.shape}, {lab_path} has {labels.shape}; "
            "re-install the dataset"
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"{lab_path} has label {int(labels.max())} outside 0..9; re-install the dataset")
    return images, labels


class FashionMNIST(Dataset):
    """Items ``(image float32 [3,S,S] in [-1,1], label int)`` of real Fashion-MNIST."""

    name = "fashion-mnist"
    classes = list(CLASSES)
    has_masks = False

    def __init__(self, split: str = "test", image_size: int = 32, root: str | os.PathLike | None = None) -> None:
        if image_size < 8:
            raise DataError(f"Fashion-MNIST image_size must be >= 8, got {image_size}")
        self.split = split
        self.image_size = int(image_size)
        self.images, labels = load_split(split, root)
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.cache_key = f"{self.name}/{split}@{self.image_size}"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return grey28_to_image(self.images[index], self.image_size), int(self.targets[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, image_size={self.image_size}, n={len(self)})"
