"""Datasets: real Fashion-MNIST, Fashion-Scenes (with exact instance masks), any ImageNet-layout folder.

Every dataset yields float images (3, S, S) in [-1, 1] and carries ``name``, ``classes``,
``has_masks`` and a ``cache_key`` that changes whenever its content would (for feature caches).
``build_dataset`` takes a registered name or a folder path.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from manifold_lab.data.fashion_mnist import FashionMNIST
from manifold_lab.data.folder import IMAGE_EXTENSIONS, ImageFolder, check_resolution
from manifold_lab.data.scenes import FashionScenes
from manifold_lab.data.transforms import center_crop_arr
from manifold_lab.errors import DataError
from manifold_lab.registry import Registry

#: name -> factory(split=..., image_size=..., **kw) -> Dataset
DATASETS: Registry[Dataset] = Registry("dataset", entry_point_group="manifold_lab.datasets")
DATASETS.register("fashion-mnist", FashionMNIST)
DATASETS.register("fashion-scenes", FashionScenes)


def build_dataset(name_or_path: str | os.PathLike, split: str = "test", image_size: int = 32, **kw) -> Dataset:
    """A registered dataset by name, or an :class:`ImageFolder` for a filesystem path.

    For a path, ``<path>/<split>`` is used when it is a folder of class folders (ImageNet's
    ``train``/``val`` layout; ``split="test"`` also accepts ``val``), else the path itself.
    Extra keywords go to the dataset (e.g. ``num_scenes``/``seed`` for fashion-scenes,
    ``masks_root`` for a folder).
    """
    name = os.fspath(name_or_path)
    if name in DATASETS:
        return DATASETS.build(name, split=split, image_size=image_size, **kw)
    path = Path(name).expanduser()
    if path.is_dir():
        for sub in (split, "val") if split == "test" else (split,):
            cand = path / sub
            if cand.is_dir() and any(d.is_dir() for d in cand.iterdir()):
                path = cand
                if "masks_root" in kw and kw["masks_root"] is not None and (Path(kw["masks_root"]) / sub).is_dir():
                    kw = {**kw, "masks_root": Path(kw["masks_root"]) / sub}
                break
        return ImageFolder(path, image_size, **kw)
    raise DataError(
        f"unknown dataset '{name}': neither a registered name ({', '.join(DATASETS.names())}) nor an existing folder"
    )


__all__ = ["DATASETS", "FashionMNIST", "FashionScenes", "IMAGE_EXTENSIONS", "ImageFolder", "build_dataset",
           "center_crop_arr", "check_resolution"]
