"""SSC of a tokenizer's reference maps (``reference_maps``): scored beside the latent, on the same scenes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from manifold_lab.errors import ManifoldLabError
from manifold_lab.measure.config import MeasureConfig, SSCConfig
from manifold_lab.measure.pipeline import _ssc_stage
from manifold_lab.measure.progress import StageTracker
from manifold_lab.reports.measure_report import _details

CFG = MeasureConfig(ssc=SSCConfig(num_scenes=12, n_init=2, examples=0), batch_size=6)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """A 'latent' that is the image itself at an 8x8 grid: coherent wherever the items differ in colour."""
    return F.adaptive_avg_pool2d(x, 8)


def _run(references):
    return _ssc_stage(_pooled, 32, (8, 8), CFG, StageTracker(enabled=False), torch.device("cpu"), references)[0]


def test_reference_maps_are_scored_on_their_own_grid_beside_the_latent() -> None:
    g = torch.Generator().manual_seed(0)

    def refs(x):
        return {"same": _pooled(x), "coarse": F.adaptive_avg_pool2d(x, 4),
                "noise": torch.randn(x.shape[0], 16, 8, 8, generator=g)}

    res = _run(refs)
    plain = _run(None)
    assert "references" not in plain
    assert res["mean"] == plain["mean"] and res["n_images"] == plain["n_images"] == 12
    same, coarse, noise = (res["references"][k] for k in ("same", "coarse", "noise"))
    assert same["mean"] == pytest.approx(res["mean"], abs=1e-12) and same["grid"] == [8, 8]
    assert coarse["grid"] == [4, 4] and 0 < coarse["n_images"] <= 12
    assert noise["mean"] < res["mean"] - 0.2, (noise["mean"], res["mean"])


@pytest.mark.parametrize("bad, match", [
    (lambda x: {"flat": torch.zeros(x.shape[0], 8)}, r"reference_maps\(\)\['flat'\] must be \(B, D, h, w\)"),
    (lambda x: {"nan": torch.full((x.shape[0], 2, 8, 8), float("nan"))}, "reference map 'nan'"),
])
def test_malformed_reference_maps_fail_in_one_line(bad, match) -> None:
    with pytest.raises(ManifoldLabError, match=match):
        _run(bad)


def test_the_report_lists_each_reference_map() -> None:
    ssc = {"mean": 0.5, "std": 0.1, "n_images": 12, "sigma": 0.1, "n_init": 2, "grid": [8, 8], "source": "scenes",
           "references": {"ssr_target": {"mean": 0.35, "std": 0.2, "n_images": 12, "grid": [4, 4]}}}
    text = "\n".join(_details({"ssc": ssc}))
    assert "reference map `ssr_target` (grid [4, 4]): SSC 0.35" in text
