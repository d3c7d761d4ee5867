"""ImageFolder: ImageNet layout at odd sizes, ADM centre crop, masks through the same geometry, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from manifold_lab.data import ImageFolder, build_dataset, center_crop_arr, check_resolution
from manifold_lab.errors import DataError


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def _rgb(h: int, w: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (h, w, 3)).copy()


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    _save(root / "cat" / "a.png", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    _save(root / "cat" / "sub" / "b.jpg", rng.integers(0, 256, (64, 100, 3), dtype=np.uint8))
    _save(root / "dog" / "c.png", rng.integers(0, 256, (23, 17), dtype=np.uint8), mode="L")
    _save(root / "dog" / "d.JPEG", _rgb(200, 300, (250, 10, 10)))
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    return root


def test_layout_labels_and_shapes(tree: Path) -> None:
    ds = ImageFolder(tree, 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    assert ds.targets.tolist() == [0, 0, 1, 1] and not ds.has_masks
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (3, 16, 16) and img.dtype == torch.float32
        assert img.min() >= -1 and img.max() <= 1 and label == ds.targets[i]
    img, _ = ds[3]  # the constant red JPEG keeps its colour through crop and resize
    assert torch.allclose(img[:, 8, 8], torch.tensor([250, 10, 10]) / 127.5 - 1, atol=0.05)
    assert isinstance(build_dataset(str(tree), image_size=16), ImageFolder)


def test_center_crop_arr_known_answer() -> None:
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 16))
    # short side 32 >= 2*16: BOX-halved to 32x16, then the central 16 columns (8..23)
    assert out.shape == (16, 16, 3)
    assert (out[:, :8] == (255, 0, 0)).all() and (out[:, 8:] == (0, 0, 255)).all()
    up = np.asarray(center_crop_arr(Image.fromarray(_rgb(10, 14, (7, 99, 200))), 20))  # bicubic upsample
    assert up.shape == (20, 20, 3) and (np.abs(up.astype(int) - (7, 99, 200)) <= 1).all()


def test_masks_follow_the_image_geometry(tmp_path: Path) -> None:
    root, masks = tmp_path / "img", tmp_path / "masks"
    _save(root / "a" / "x.png", _rgb(20, 40, (1, 2, 3)))
    ids = np.repeat(np.arange(20, dtype=np.uint8) + 1, 2)[None].repeat(20, 0)  # 2-px wide stripes, ids 1..20
    _save(masks / "a" / "x.png", ids, mode="L")
    _save(root / "a" / "y.jpg", _rgb(20, 40, (1, 2, 3)))
    pan = np.zeros((20, 40, 3), dtype=np.uint8)
    pan[:, 20:] = (5, 3, 1)  # COCO-panoptic id 5 + 256*3 + 65536*1
    _save(masks / "a" / "y.png", pan)
    ds = ImageFolder(root, 10, masks_root=masks)
    assert ds.has_masks
    img, mask, label = ds[0]
    assert img.shape == (3, 10, 10) and mask.shape == (10, 10) and mask.dtype == torch.int64 and label == 0
    # 40x20 -> halved (NEAREST) to 20x10 (ids 1..20 one per column) -> central 10 columns 5..14
    assert torch.equal(mask, torch.arange(6, 16).expand(10, 10))
    _, pmask, _ = ds[1]
    assert set(pmask.unique().tolist()) == {0, 5 + 256 * 3 + 65536}
    assert (pmask[:, :5] == 0).all() and (pmask[:, 5:] == 5 + 256 * 3 + 65536).all()


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        ImageFolder(tmp_path / "absent", 32)
    assert str(tmp_path / "absent") in str(err.value)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DataError) as err:
        build_dataset(str(tmp_path / "empty"), image_size=32)
    assert str(tmp_path / "empty") in str(err.value) and ".png" in str(err.value) and ".jpg" in str(err.value)
    with pytest.raises(DataError, match="neither a registered name"):
        build_dataset(str(tmp_path / "nope"))


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "r" / "c" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageFolder(tmp_path / "r", 8)
    with pytest.raises(DataError) as err:
        ds[0]
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_mask_missing_or_wrong_size(tmp_path: Path) -> None:
    root, masks = tmp_path / "img", tmp_path / "masks"
    img_a = _save(root / "c" / "a.png", _rgb(12, 16, (9, 9, 9)))
    img_b = _save(root / "c" / "b.png", _rgb(12, 16, (9, 9, 9)))
    mask_a = _save(masks / "c" / "a.png", np.zeros((12, 15), dtype=np.uint8), mode="L")
    ds = ImageFolder(root, 8, masks_root=masks)
    with pytest.raises(DataError) as err:
        ds[0]
    msg = str(err.value)
    assert str(mask_a) in msg and str(img_a) in msg and "15x12" in msg and "16x12" in msg
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(masks / "c" / "b.png") in str(err.value) and str(img_b) in str(err.value)


def test_split_subfolder_and_val_fallback(tmp_path: Path) -> None:
    _save(tmp_path / "ds" / "val" / "k1" / "a.png", _rgb(8, 8, (0, 0, 0)))
    _save(tmp_path / "ds" / "train" / "k1" / "a.png", _rgb(8, 8, (0, 0, 0)))
    _save(tmp_path / "ds" / "train" / "k2" / "a.png", _rgb(8, 8, (0, 0, 0)))
    assert len(build_dataset(str(tmp_path / "ds"), split="test", image_size=8)) == 1
    assert build_dataset(str(tmp_path / "ds"), split="train", image_size=8).classes == ["k1", "k2"]


def test_check_resolution() -> None:
    check_resolution(256, {256, 512}, "rae")
    with pytest.raises(DataError, match=r"tokenizer rae cannot take 32x32 images; it supports 256x256, 512x512"):
        check_resolution(32, {512, 256}, "rae")

    def multiple_of_16(n: int) -> bool:
        """multiples of 16"""
        return n % 16 == 0

    check_resolution(64, multiple_of_16, "pae")
    with pytest.raises(DataError, match="tokenizer pae cannot take 40x40 images; it supports multiples of 16"):
        check_resolution(40, multiple_of_16, "pae")
