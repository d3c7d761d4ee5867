"""Feature cache: computed once, recomputed when a key part changes, resumed after a killed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from manifold_lab.encoders import cached_features
from manifold_lab.errors import DataError


class Toy(Dataset):
    def __init__(self, n: int, labelled: bool = True) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
        self.labels = torch.arange(n) % 3
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return (self.images[i], int(self.labels[i])) if self.labelled else self.images[i]


class CountingFn:
    """A feature function that records how many images it was asked for."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def _expected(ds: Toy) -> torch.Tensor:
    return torch.cat([ds.images.mean(dim=(2, 3)), ds.images.amax(dim=(2, 3))], dim=1)


def test_computed_once_then_read(tmp_path: Path) -> None:
    ds, fn = Toy(50), CountingFn()
    out = cached_features(fn, "toy-net|w:abc", ds, "toy/test", batch_size=8, shard_size=16, cache_dir=tmp_path)
    assert fn.rows == 50
    torch.testing.assert_close(out["features"], _expected(ds))
    assert torch.equal(out["labels"], ds.labels)
    (folder,) = list(tmp_path.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 4 and manifest["fn_key"] == "toy-net|w:abc"
    assert manifest["dataset_key"] == "toy/test" and manifest["num_items"] == 50
    assert len(list(folder.glob("shard_*.safetensors"))) == 4

    again = cached_features(fn, "toy-net|w:abc", ds, "toy/test", batch_size=8, shard_size=16, cache_dir=tmp_path)
    assert fn.rows == 50  # nothing recomputed
    assert torch.equal(again["features"], out["features"]) and torch.equal(again["labels"], out["labels"])


@pytest.mark.parametrize("change", [{"fn_key": "toy-net|w:def"}, {"dataset_key": "toy/train"},
                                    {"transform_key": "flip"}, {"shard_size": 10}])
def test_any_key_change_recomputes(tmp_path: Path, change: dict) -> None:
    ds, fn = Toy(20), CountingFn()
    base = {"fn_key": "net", "dataset_key": "toy", "transform_key": "", "shard_size": 16}
    cached_features(fn, dataset=ds, cache_dir=tmp_path, **base)
    cached_features(fn, dataset=ds, cache_dir=tmp_path, **{**base, **change})
    assert fn.rows == 40
    assert len(list(tmp_path.iterdir())) == 2


def test_killed_run_resumes_at_missing_shard(tmp_path: Path) -> None:
    ds, fn = Toy(50), CountingFn()
    cached_features(fn, "net", ds, "toy", shard_size=16, cache_dir=tmp_path)
    (folder,) = list(tmp_path.iterdir())
    (folder / "shard_00003.safetensors").unlink()  # as if killed while writing the last shard
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    fn.rows = 0
    progress: list[tuple[int, int]] = []
    out = cached_features(fn, "net", ds, "toy", shard_size=16, cache_dir=tmp_path,
                          progress=lambda done, total: progress.append((done, total)))
    assert fn.rows == 2  # only the last shard (rows 48..49) was computed
    torch.testing.assert_close(out["features"], _expected(ds))
    assert progress[-1] == (50, 50)
    assert json.loads((folder / "manifest.json").read_text())["complete"]

    shard = folder / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])  # a damaged shard is recomputed, not trusted
    fn.rows = 0
    out = cached_features(fn, "net", ds, "toy", shard_size=16, cache_dir=tmp_path)
    assert fn.rows == 16
    torch.testing.assert_close(out["features"], _expected(ds))


def test_unlabelled_dataset_default_dir_and_bad_fn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANIFOLD_LAB_CACHE", str(tmp_path / "cache"))
    ds = Toy(7, labelled=False)
    out = cached_features(CountingFn(), "net", ds, "toy-unlabelled", batch_size=3)
    assert out["labels"] is None and out["features"].shape == (7, 6)
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 1
    with pytest.raises(DataError, match="one row per image"):
        cached_features(lambda x: x[:1], "bad", ds, "toy-unlabelled", batch_size=3, cache_dir=tmp_path / "x")
    with pytest.raises(DataError, match="empty"):
        cached_features(CountingFn(), "net", Toy(0), "none", cache_dir=tmp_path / "y")
