"""Typed configs, the registry and atomic writes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from manifold_lab.config import from_dict, load_config, parse_override, to_dict
from manifold_lab.errors import CheckpointError, ConfigError, ManifoldLabError
from manifold_lab.io import atomic_dir, load_tensors, save_tensors, write_json
from manifold_lab.registry import Registry


@dataclass
class Inner:
    rate: float = 0.1
    sizes: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    name: str = "a"
    steps: int = 10
    flag: bool = False
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_and_overrides(tmp_path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 20\ninner:\n  rate: 0.5\n")
    cfg = load_config(Outer, cfg_file, ["inner.sizes=[3,4,5]", "flag=true", "maybe=7", "name=b"])
    assert cfg == Outer(name="b", steps=20, flag=True, maybe=7, inner=Inner(rate=0.5, sizes=(3, 4, 5)))
    assert to_dict(cfg)["inner"]["sizes"] == [3, 4, 5]
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key inner\.nope; valid keys in inner: rate, sizes"):
        load_config(Outer, None, ["inner.nope=1"])
    with pytest.raises(ConfigError, match="steps must be an integer"):
        load_config(Outer, None, ["steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("steps")


def test_registry_unknown_name_lists_valid() -> None:
    reg: Registry = Registry("widget")
    reg.register("b")(lambda: 2)
    reg.register("a", lambda: 1)
    assert reg.names() == ["a", "b"] and reg.build("b") == 2
    with pytest.raises(ManifoldLabError, match="unknown widget 'c'; valid names: a, b"):
        reg.get("c")
    with pytest.raises(ValueError):
        reg.register("a", lambda: 3)


def test_atomic_tensor_round_trip_and_corruption(tmp_path) -> None:
    t = {"x": torch.randn(3, 4), "y": torch.arange(5)}
    save_tensors(tmp_path / "t.safetensors", t)
    back = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(back["x"], t["x"]) and torch.equal(back["y"], t["y"])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_tensors(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_dir_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "results"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            write_json(tmp / "metrics.json", {"a": 1})
            raise RuntimeError("boom")
    assert not target.exists() and os.listdir(tmp_path) == []
    with atomic_dir(target) as tmp:
        write_json(tmp / "metrics.json", {"a": 2})
    assert (target / "metrics.json").read_text().strip().endswith("}")
