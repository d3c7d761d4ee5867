"""Real Fashion-MNIST from the Debian package, torchvision's folder layout, and one-line failures."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from manifold_lab.data import DATASETS, FashionMNIST, build_dataset
from manifold_lab.data import fashion_mnist as fm
from manifold_lab.errors import DataError


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def test_real_splits_sizes_and_balanced_labels() -> None:
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    assert test.classes[0] == "T-shirt/top" and test.classes[9] == "Ankle boot" and len(test.classes) == 10
    assert test.name == "fashion-mnist" and test.targets.dtype == torch.int64


def test_item_is_padded_exact_pixels_at_32() -> None:
    ds = FashionMNIST("test", image_size=32)
    img, label = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and isinstance(label, int)
    assert label == int(ds.targets[3])
    raw = torch.from_numpy(ds.images[3].astype(np.float32)) / 127.5 - 1
    assert torch.equal(img[0, 2:30, 2:30], raw)  # exact pixels inside
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert bool((img[:, border] == -1).all())  # 2 px of background
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])  # grey replicated
    assert img.min() >= -1 and img.max() <= 1 and img.max() > 0.5


def test_other_sizes_resize_and_28_is_identity() -> None:
    ds28, ds64 = FashionMNIST("test", image_size=28), FashionMNIST("test", image_size=64)
    img28, _ = ds28[0]
    assert torch.equal(img28[0], torch.from_numpy(ds28.images[0].astype(np.float32)) / 127.5 - 1)
    img64, _ = ds64[0]
    assert img64.shape == (3, 64, 64) and img64.min() >= -1 and img64.max() <= 1
    # a bilinear 28 -> 64 resize keeps the mean brightness close
    assert abs(img64.mean().item() - img28.mean().item()) < 0.02
    assert isinstance(build_dataset("fashion-mnist", split="test", image_size=32), FashionMNIST)
    assert "fashion-mnist" in DATASETS.names()


def test_torchvision_layout_uncompressed(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    images = np.arange(5 * 28 * 28, dtype=np.int64).reshape(5, 28, 28) % 256
    _write_idx(raw / "t10k-images-idx3-ubyte", images, gz=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([4, 0, 9, 1, 1]), gz=False)
    ds = FashionMNIST("test", image_size=28, root=tmp_path)  # an explicit root is searched first
    assert len(ds) == 5 and ds.targets.tolist() == [4, 0, 9, 1, 1]
    img, label = ds[2]
    assert label == 9 and torch.equal(img[0], torch.from_numpy(images[2].astype(np.float32)) / 127.5 - 1)


@pytest.mark.parametrize("damage", ["magic", "truncated", "not-gzip"])
def test_corrupt_file_is_named(tmp_path: Path, damage: str) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([1, 2]), gz=True)
    bad = raw / "t10k-images-idx3-ubyte.gz"
    if damage == "magic":
        with gzip.open(bad, "wb") as fh:
            fh.write(b"\x00\x00\x09\x03" + b"\x00" * 64)
    elif damage == "truncated":
        _write_idx(bad, np.zeros((2, 28, 28)), gz=True)
        data = gzip.decompress(bad.read_bytes())[:-10]
        bad.write_bytes(gzip.compress(data))
    else:
        bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError) as err:
        FashionMNIST("test", root=tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_missing_files_say_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as err:
        FashionMNIST("train", root=tmp_path / "empty")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "empty" / "FashionMNIST" / "raw") in msg
    with pytest.raises(DataError, match="split"):
        FashionMNIST("validation")
