"""Study files: validation in one line, runs x seeds, stage dependencies, content-addressed keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from manifold_lab.errors import ConfigError
from manifold_lab.studies.config import load_study, needed_stages
from manifold_lab.studies.runner import validate_study
from manifold_lab.studies.stages import RunContext
from study_helpers import tiny_study

REPO = Path(__file__).resolve().parents[2]


def test_unknown_keys_are_rejected_with_the_valid_ones(tmp_path) -> None:
    path = tiny_study(tmp_path, colour="blue")
    with pytest.raises(ConfigError) as err:
        load_study(path)
    msg = str(err.value)
    assert "colour" in msg and "variants" in msg and "budgets" in msg and "\n" not in msg
    data = yaml.safe_load(path.read_text())
    del data["colour"]
    data["variants"][0]["seed"] = 3  # typo for 'seeds'
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="seeds"):
        load_study(path)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(stages=["tokenizer", "dance"]), "unknown stage"),
    (lambda d: d["variants"][0].update(panels=["nope"]), "unknown panel"),
    (lambda d: d["variants"][1].update(label="vae c=2"), "unique"),
    (lambda d: d.update(default_budget="gpu"), "default_budget"),
    (lambda d: d["panels"][0].update(metric="FID"), "metric must be one of"),
    (lambda d: d.update(executor={"kind": "kubernetes"}), "executor.kind"),
])
def test_bad_study_files_fail_in_one_line(tmp_path, change, match) -> None:
    path = tiny_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match) as err:
        load_study(path)
    assert "\n" not in str(err.value)


def test_bad_overrides_fail_before_anything_runs(tmp_path) -> None:
    path = tiny_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["variants"][0]["set"] = ["model.z_chanels=2"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="VAE C=2.*z_chanels"):
        validate_study(load_study(path), "smoke", tmp_path)
    study = load_study(tiny_study(tmp_path, budgets={"smoke": {"gfid_set": ["train.stepz=3"]}}))
    with pytest.raises(ConfigError, match="stepz"):
        validate_study(study, "smoke", tmp_path)
    with pytest.raises(ConfigError, match="no budget 'cpu'"):
        validate_study(study, "cpu", tmp_path)


def test_runs_cross_variants_with_seeds_and_stages_pull_their_inputs(tmp_path) -> None:
    study = load_study(tiny_study(tmp_path, seeds=[0, 1], stages=["evaluate"]))
    assert study.stages == ["tokenizer", "cache_latents", "train_dit", "sample", "evaluate"]  # no measure
    assert [r.run_id for r in study.runs()] == ["vae-c2-s0", "vae-c2-s1", "vae-c4-s0", "vae-c4-s1"]
    assert [r.run_id for r in study.runs(["VAE C=4"])] == ["vae-c4-s0", "vae-c4-s1"]
    with pytest.raises(ConfigError, match="unknown variant"):
        study.runs(["VAE C=3"])
    assert needed_stages(["measure"]) == ["tokenizer", "measure"]


def test_stage_keys_follow_settings_and_inputs(tmp_path) -> None:
    study = load_study(tiny_study(tmp_path, seeds=[0, 1]))
    c2s0, c2s1, c4s0, _ = (RunContext(study=study, budget_name="smoke", run=r, work=tmp_path) for r in study.runs())
    # a different tokenizer changes every key downstream of it
    assert all(c2s0.key(s) != c4s0.key(s) for s in study.stages)
    # the seed changes the tokenizer, and so everything after it
    assert c2s0.key("tokenizer") != c2s1.key("tokenizer")
    # the same settings give the same key (a second study with the same variant shares the output)
    other = load_study(tiny_study(tmp_path, name="other"))
    same = RunContext(study=other, budget_name="smoke", run=other.runs()[0], work=tmp_path)
    assert [same.key(s) for s in study.stages] == [c2s0.key(s) for s in study.stages]
    # cosmetic training settings do not change the DiT's key; a real one does
    quiet = load_study(tiny_study(tmp_path, name="quiet", budgets={"smoke": {
        **yaml.safe_load((tmp_path / "tiny.yaml").read_text())["budgets"]["smoke"],
        "gfid_set": [*study.budgets["smoke"].gfid_set, "train.log_every=7"]}}))
    q = RunContext(study=quiet, budget_name="smoke", run=quiet.runs()[0], work=tmp_path)
    assert q.key("train_dit") == c2s0.key("train_dit")
    longer = load_study(tiny_study(tmp_path, name="longer", budgets={"smoke": {
        **yaml.safe_load((tmp_path / "tiny.yaml").read_text())["budgets"]["smoke"],
        "gfid_set": [*study.budgets["smoke"].gfid_set, "train.steps=5"]}}))
    lg = RunContext(study=longer, budget_name="smoke", run=longer.runs()[0], work=tmp_path)
    assert lg.key("cache_latents") == c2s0.key("cache_latents") and lg.key("train_dit") != c2s0.key("train_dit")
    assert lg.key("sample") != c2s0.key("sample")  # an input changed


@pytest.mark.parametrize("name", ["pilot", "zoo"])
def test_the_shipped_studies_are_valid(name) -> None:
    study = load_study(REPO / "studies" / f"{name}.yaml")
    for budget in study.budgets:
        validate_study(study, budget)
    assert {"cpu", "smoke"} <= set(study.budgets)
    if name == "pilot":
        assert len(study.variants) >= 16 and len(study.panels) == 4
        for panel in study.panels:
            assert sum(panel.name in v.panels for v in study.variants) >= 4, panel.name
        assert any(v.seeds is not None and len(v.seeds) >= 3 for v in study.variants)
    else:
        assert {v.tokenizer for v in study.variants} == {"vae", "vavae", "rae", "svg", "ul", "pae"}
