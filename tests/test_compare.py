"""`manifold-lab compare`: variants measured once, stored, reused on a rerun, reported side by side."""

from __future__ import annotations

import json

import pytest
import torch

from manifold_lab.errors import ConfigError
from manifold_lab.measure import compare as compare_mod
from manifold_lab.measure.compare import CompareConfig, Variant, load_comparison, load_records, run_comparison
from manifold_lab.reports.compare_report import write_comparison_report
from manifold_lab.tokenizers import TOKENIZERS, TokenizerSpec, VAE, VAEConfig

TINY_MEASURE = ["num_images=60", "recon_images=20", "ssc.num_scenes=6", "lpc.num_images=4", "lpc.path_pairs=0",
                "probes.num_points=60", "probes.umap=false", "probes.tsne=false", "probes.linear_probe=false",
                "gsq.per_class=5", "gsq.repeats=2", "batch_size=20"]


def _tiny(seed: int):
    def build():
        torch.manual_seed(seed)
        return VAE(VAEConfig(base_channels=8, ch_mult=(1, 2, 2), z_channels=4)).eval()
    return build


@pytest.fixture
def toy_specs():
    names = ["cmp-toy-a", "cmp-toy-b"]
    for i, name in enumerate(names):
        TOKENIZERS.register(name, TokenizerSpec(name=name, config_cls=VAEConfig, build=VAE, pretrained=_tiny(i)))
    yield names
    for name in names:
        TOKENIZERS._factories.pop(name, None)


def test_comparison_runs_stores_reuses_and_reports(tmp_path, toy_specs, monkeypatch):
    (tmp_path / "v.yaml").write_text(
        "title: toy\nbaseline: A\nmeasure: [" + ", ".join(TINY_MEASURE) + "]\n"
        "variants:\n  - {label: A, tokenizer: cmp-toy-a}\n  - {label: B, tokenizer: cmp-toy-b}\n")
    cfg = load_comparison(tmp_path / "v.yaml")
    records = run_comparison(cfg, tmp_path, progress=False)
    assert [r["variant"]["label"] for r in records] == ["A", "B"]
    stored = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert stored["meta"]["subject"]["tokenizer"] == "cmp-toy-a"
    assert records[0]["summary"]["PSNR"] != records[1]["summary"]["PSNR"]  # different weights, different numbers

    calls = []
    monkeypatch.setattr("manifold_lab.measure.pipeline.measure_tokenizer",
                        lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError("recomputed")))
    again = run_comparison(cfg, tmp_path, progress=False)  # everything stored: nothing is measured
    assert not calls and [r["summary"] for r in again] == [r["summary"] for r in records]

    write_comparison_report(cfg, load_records(cfg, tmp_path), tmp_path, "manifold-lab compare v.yaml")
    report = (tmp_path / "report.md").read_text()
    assert "| A | cmp-toy-a |" in report and "Against the baseline" in report and "profile.png" in report
    assert (tmp_path / "profile.png").stat().st_size > 10_000
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("label,tokenizer")


def test_changed_measure_settings_invalidate_stored_results(tmp_path, toy_specs):
    cfg = CompareConfig(variants=[Variant("A", "cmp-toy-a")], measure=TINY_MEASURE)
    run_comparison(cfg, tmp_path, progress=False)
    changed = CompareConfig(variants=[Variant("A", "cmp-toy-a")], measure=TINY_MEASURE + ["seed=1"])
    with pytest.raises(ConfigError, match="no stored results for A"):
        load_records(changed, tmp_path)
    assert compare_mod.variant_key(cfg.variants[0], cfg.measure) != compare_mod.variant_key(changed.variants[0],
                                                                                           changed.measure)


def test_bad_comparison_files_fail_in_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("variants:\n  - {label: A, tokenizer: vae, colour: red}\n")
    with pytest.raises(ConfigError, match="colour"):
        load_comparison(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="unique"):
        CompareConfig(variants=[Variant("A", "vae"), Variant("a", "vae")])
    with pytest.raises(ConfigError, match="baseline"):
        CompareConfig(variants=[Variant("A", "vae")], baseline="Z")
    with pytest.raises(ConfigError, match="at least one variant"):
        CompareConfig()
