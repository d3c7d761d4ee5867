"""The whole chain at the smoke budget through the CLI: gfid, then sample/evaluate by hand; resume and refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from manifold_lab.cli import main

sys.path.insert(0, str(Path(__file__).parent))


def run_cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exc:  # typer's standalone exit on success
        assert exc.code in (0, None), exc.code


@pytest.fixture(scope="module")
def chain(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gfid") / "run"
    run_cli("gfid", "--checkpoint", str(tiny_tokenizer_dir), "--budget", "smoke", "--out", str(out), "--no-progress")
    return out


def test_gfid_chain_writes_metrics_samples_and_report(chain):
    record = json.loads((chain / "gfid.json").read_text())
    m = record["metrics"]
    assert m["backbone"].startswith("mobilenet_v2") and m["n_samples"] == 20 and m["n_reference"] == 40
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["inception_score"] is not None and m["inception_score"] >= 1
    assert set(record["stage_seconds"]) == {"tokenizer", "cache_latents", "train_dit", "sample", "evaluate"}
    with np.load(chain / "samples" / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (20, 16, 16, 3)
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10  # class-balanced
    assert (chain / "samples" / "grid.png").stat().st_size > 1000
    report = (chain / "report.md").read_text()
    assert "gFID" in report and m["backbone"] in report and "grid.png" in report


def test_rerun_reuses_every_stage_and_gives_the_same_samples(chain, tiny_tokenizer_dir):
    before = (chain / "samples" / "samples.npz").read_bytes()
    dit_mtime = (chain / "dit" / "model.safetensors").stat().st_mtime_ns
    run_cli("gfid", "--checkpoint", str(tiny_tokenizer_dir), "--budget", "smoke", "--out", str(chain), "--no-progress")
    assert (chain / "dit" / "model.safetensors").stat().st_mtime_ns == dit_mtime
    assert (chain / "samples" / "samples.npz").read_bytes() == before


def test_sample_resumes_from_its_chunks_and_matches(chain, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "s"
    args = ["sample", str(chain / "dit"), "--checkpoint", str(tiny_tokenizer_dir), "--budget", "smoke", "--out",
            str(out), "--no-progress"]
    run_cli(*args)
    full = np.load(out / "samples.npz")["arr_0"]
    reference = np.load(chain / "samples" / "samples.npz")["arr_0"]
    assert np.array_equal(full, reference)
    (out / "samples.npz").unlink()
    (out / "parts" / "chunk-00001.npz").unlink()  # as if killed while drawing the second chunk
    kept = (out / "parts" / "chunk-00000.npz").stat().st_mtime_ns
    run_cli(*args)
    assert (out / "parts" / "chunk-00000.npz").stat().st_mtime_ns == kept
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], full)
    # another chunking (as with another number of processes) draws the same samples, up to batch effects
    other = tmp_path / "other"
    run_cli("sample", str(chain / "dit"), "--checkpoint", str(tiny_tokenizer_dir), "--budget", "smoke", "--out",
            str(other), "--no-progress", "--set", "sample.batch_size=7")
    diff = np.abs(np.load(other / "samples.npz")["arr_0"].astype(int) - full.astype(int))
    assert diff.max() <= 2
    # settings changed under an existing folder: refused, nothing overwritten
    with pytest.raises(SystemExit) as exc:
        main(args[:-1] + ["--no-progress", "--set", "sample.steps=3"])
    assert exc.value.code == 2


def test_evaluate_command_and_refusals(chain, tmp_path, capsys):
    run_cli("evaluate", str(chain / "samples" / "samples.npz"), "--ref", "fashion-mnist", "--image-size", "16",
            "--max-items", "40", "--backbone", "mobilenet_v2", "--out", str(tmp_path / "m.json"), "--no-progress")
    again = json.loads((tmp_path / "m.json").read_text())
    stored = json.loads((chain / "gfid.json").read_text())["metrics"]
    assert again["fid"] == pytest.approx(stored["fid"], rel=1e-6)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path / "missing.npz"), "--no-progress"])
    assert exc.value.code == 2
    assert "missing.npz" in capsys.readouterr().err


def test_a_dit_is_not_decoded_by_another_tokenizer(chain, tmp_path, capsys):
    from diffusion_helpers import tiny_tokenizer
    import torch

    other = tiny_tokenizer()
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    other.save(tmp_path / "other-tok")
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(chain / "dit"), "--checkpoint", str(tmp_path / "other-tok"), "--budget", "smoke",
              "--out", str(tmp_path / "x"), "--no-progress"])
    assert exc.value.code == 2
    assert "another" in capsys.readouterr().err
    assert not (tmp_path / "x" / "samples.npz").exists()


def test_unknown_recipe_key_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gfid", "--budget", "smoke", "--set", "train.stepz=3", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "steps" in err


def test_two_processes_split_the_chunks_and_draw_the_same_samples(chain, tiny_tokenizer_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp
    from dit_workers import ddp_sample

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_sample, args=(2, port, str(chain / "dit"), str(tiny_tokenizer_dir), str(tmp_path / "ddp")),
             nprocs=2, join=True)
    with np.load(tmp_path / "ddp" / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    with np.load(chain / "samples" / "samples.npz") as npz:
        assert np.array_equal(images, npz["arr_0"]) and np.array_equal(labels, npz["arr_1"])
    assert json.loads((tmp_path / "ddp" / "samples.json").read_text())["processes"] == 2
