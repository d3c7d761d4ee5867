"""Fashion-Scenes: deterministic by (seed, index), masks exact per pixel, at least two segments."""

from __future__ import annotations

import pytest
import torch

from manifold_lab.data import FashionScenes, build_dataset


def test_deterministic_by_seed_and_index() -> None:
    a = FashionScenes(num_scenes=20, seed=3)
    b = FashionScenes(num_scenes=20, seed=3)
    late = b[17]  # read alone, out of order
    for x, y in zip(a[17], late):
        assert torch.equal(x, y)
    for i in (0, 5):
        for x, y in zip(a[i], b[i]):
            assert torch.equal(x, y)
    other = FashionScenes(num_scenes=20, seed=4)
    assert not torch.equal(a[0][0], other[0][0])
    assert a.cache_key != other.cache_key
    assert not torch.equal(a[0][0], a[1][0])


@pytest.mark.parametrize("size", [32, 48])
def test_masks_are_exact(size: int) -> None:
    ds = build_dataset("fashion-scenes", split="test", image_size=size, num_scenes=30, seed=1)
    assert isinstance(ds, FashionScenes) and ds.has_masks and ds.name == "fashion-scenes"
    for i in range(len(ds)):
        img, mask, inst = ds[i]
        assert img.shape == (3, size, size) and mask.shape == (size, size) and inst.shape == (3,)
        assert img.min() >= -1 and img.max() <= 1 and mask.dtype == torch.int64
        ids = mask.unique().tolist()
        k = max(ids)
        assert ids == list(range(k + 1))  # background plus dense ids 1..k
        assert 2 <= k <= 3  # min_items=2 survived, so >= 3 segments with the background
        assert (inst[:k] >= 0).all() and (inst[:k] <= 9).all() and (inst[k:] == -1).all()
        rgb = (img + 1) / 2  # [3,S,S] in [0,1]
        bg = rgb[:, mask == 0]
        # every background pixel has the one background colour ...
        assert torch.allclose(bg, bg[:, :1].expand_as(bg), atol=1e-6)
        for j in range(1, k + 1):
            px = rgb[:, mask == j]
            assert px.shape[1] >= ds.min_visible
            # ... and no pixel of item j has it (painted pixels are brighter than the dark background)
            assert ((px - bg[:, :1]).abs().max(dim=0).values > 0.05).all()
            # every pixel of item j carries item j's tint: one colour direction per segment
            direction = px / px.norm(dim=0, keepdim=True)
            assert torch.allclose(direction, direction[:, :1].expand_as(direction), atol=1e-5)
        if k >= 2:  # different items have different tints
            d1 = rgb[:, mask == 1][:, 0]
            d2 = rgb[:, mask == 2][:, 0]
            assert not torch.allclose(d1 / d1.norm(), d2 / d2.norm(), atol=1e-3)


def test_item_counts_follow_the_range() -> None:
    ds = FashionScenes(num_scenes=40, min_items=3, max_items=3, image_size=48, seed=0)
    counts = [int(ds[i][1].max()) for i in range(len(ds))]
    assert max(counts) == 3 and sum(c == 3 for c in counts) >= 30
    with pytest.raises(Exception, match="min_items"):
        FashionScenes(min_items=3, max_items=2)
