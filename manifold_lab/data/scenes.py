"""Fashion-Scenes: multi-object images with exact instance masks, built from real Fashion-MNIST items.

SSC needs images whose ground-truth segmentation is known. No segmentation dataset can be had
offline, so each scene composes 2-3 (configurable) real Fashion-MNIST garments on a dark canvas:

* the number of items ``k`` is uniform in [min_items, max_items];
* each item is resized (antialiased bilinear) to a random side of 40-70 % of the canvas
  (``scale_range``) and placed at a uniformly random position fully inside the canvas;
* each item gets a random tint (HSV: any hue, saturation 0.5-1, value 0.75-1);
* the background is one uniform dark colour (each channel uniform in [0, 0.12]).

**Mask rule.** An item covers exactly the pixels where its resized intensity (in [0, 1]) exceeds
``threshold`` (default 0.25). Those pixels are painted opaquely with ``tint * (0.3 + 0.7 *
intensity)`` (so the garment's texture stays visible); later items overwrite earlier ones. The mask
holds, per pixel, the id of the item painted last there (0 = background), so it is exact: every
pixel with id j has item j's tint direction and every pixel with id 0 has the background colour.
Items left with fewer than ``min_visible`` pixels after occlusion are dropped and the scene is
re-rendered without them (revealing what they covered); ids are then renumbered densely 1..k in
painting order. If fewer than ``min_items`` items survive, positions and sizes are redrawn (up to
``max_attempts`` times, then the last draw is kept).

Every scene is drawn from its own generator seeded by ``(seed, index)``, so any index can be read
alone, in any order, in any worker, and gives the same scene.
"""

from __future__ import annotations

import colorsys
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from manifold_lab.data.fashion_mnist import CLASSES, load_split
from manifold_lab.data.transforms import resize_float
from manifold_lab.errors import DataError

#: Bumped whenever the scene generator changes, so cached features of old scenes are not reused.
GENERATOR_VERSION = 1


class FashionScenes(Dataset):
    """Items ``(image [3,S,S] in [-1,1], mask LongTensor [S,S], instance_labels LongTensor [max_items])``.

    ``instance_labels[j-1]`` is the Fashion-MNIST class of mask id ``j``; unused slots are -1.
    """

    name = "fashion-scenes"
    classes = list(CLASSES)
    has_masks = True

    def __init__(self, num_scenes: int = 1000, image_size: int = 32, min_items: int = 2, max_items: int = 3,
                 split: str = "test", seed: int = 0, root: str | os.PathLike | None = None,
                 scale_range: tuple[float, float] = (0.4, 0.7), threshold: float = 0.25,
                 min_visible: int | None = None, max_attempts: int = 20) -> None:
        if num_scenes < 1:
            raise DataError(f"fashion-scenes num_scenes must be >= 1, got {num_scenes}")
        if not 1 <= min_items <= max_items:
            raise DataError(f"fashion-scenes needs 1 <= min_items <= max_items, got {min_items} and {max_items}")
        if image_size < 8:
            raise DataError(f"fashion-scenes image_size must be >= 8, got {image_size}")
        lo, hi = scale_range
        if not 0 < lo <= hi <= 1:
            raise DataError(f"fashion-scenes scale_range must satisfy 0 < lo <= hi <= 1, got {scale_range}")
        self.num_scenes = int(num_scenes)
        self.image_size = int(image_size)
        self.min_items, self.max_items = int(min_items), int(max_items)
        self.split, self.seed = split, int(seed)
        self.scale_range = (float(lo), float(hi))
        self.threshold = float(threshold)
        self.min_visible = int(min_visible) if min_visible is not None else max(4, round(0.02 * image_size ** 2))
        self.max_attempts = max(1, int(max_attempts))
        self.items, self.item_labels = load_split(split, root)
        self.cache_key = (f"{self.name}-v{GENERATOR_VERSION}/{split}/n{self.num_scenes}/seed{self.seed}/"
                          f"items{self.min_items}-{self.max_items}/scale{lo:g}-{hi:g}/thr{self.threshold:g}/"
                          f"vis{self.min_visible}@{self.image_size}")

    def __len__(self) -> int:
        return self.num_scenes

    def _draw(self, rng: np.random.Generator, k: int) -> list[dict]:
        s = self.image_size
        draws = []
        for _ in range(k):
            idx = int(rng.integers(0, self.items.shape[0]))
            side = int(np.clip(round(rng.uniform(*self.scale_range) * s), 4, s))
            y0, x0 = int(rng.integers(0, s - side + 1)), int(rng.integers(0, s - side + 1))
            tint = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0)))
            draws.append({"idx": idx, "side": side, "y0": y0, "x0": x0, "tint": tint})
        return draws

    def _render(self, draws: list[dict], background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.image_size
        canvas = np.broadcast_to(background[:, None, None], (3, s, s)).copy()
        ids = np.zeros((s, s), dtype=np.int64)
        for j, d in enumerate(draws, start=1):
            item = torch.from_numpy(self.items[d["idx"]].astype(np.float32) / 255.0)[None]
            inten = resize_float(item, d["side"])[0].clamp(0, 1).numpy().astype(np.float64)
            region = inten > self.threshold
            ys, xs = np.nonzero(region)
            ys, xs = ys + d["y0"], xs + d["x0"]
            canvas[:, ys, xs] = d["tint"][:, None] * (0.3 + 0.7 * inten[region])[None]
            ids[ys, xs] = j
        return canvas, ids

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(canvas float64 [3,S,S] in [0,1], ids int64 [S,S], class label per id) of scene ``index``."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"scene index {index} out of range 0..{self.num_scenes - 1}")
        rng = np.random.default_rng([self.seed, index, 0x5CE7E5])
        background = rng.uniform(0.0, 0.12, size=3)
        k = int(rng.integers(self.min_items, self.max_items + 1))
        for _ in range(self.max_attempts):
            draws = self._draw(rng, k)
            _, ids = self._render(draws, background)
            counts = np.bincount(ids.ravel(), minlength=k + 1)[1:]
            kept = [d for d, c in zip(draws, counts) if c >= self.min_visible]
            if len(kept) >= self.min_items:
                break
        canvas, ids = self._render(kept, background)  # dropped items removed; ids already dense 1..len(kept)
        return canvas, ids, [int(self.item_labels[d["idx"]]) for d in kept]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        canvas, ids, labels = self.scene(int(index))
        image = torch.from_numpy(canvas).to(torch.float32) * 2.0 - 1.0
        inst = torch.full((self.max_items,), -1, dtype=torch.int64)
        inst[: len(labels)] = torch.tensor(labels, dtype=torch.int64)
        return image, torch.from_numpy(ids), inst

    def __repr__(self) -> str:
        return (f"FashionScenes(num_scenes={self.num_scenes}, image_size={self.image_size}, "
                f"items={self.min_items}-{self.max_items}, split={self.split!r}, seed={self.seed})")
