"""`manifold-lab measure` end to end on a tiny tokenizer, and its one-line failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from manifold_lab.io import save_tensors

EXE = str(Path(sys.executable).parent / "manifold-lab")

# small but complete settings: every stage runs, on a few hundred images
SMALL = [
    "num_images=300", "recon_images=100", "batch_size=100", "ssc.num_scenes=40", "ssc.examples=3",
    "lpc.num_images=16", "lpc.path_pairs=8", "probes.num_points=200", "gsq.per_class=20", "gsq.repeats=2",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from manifold_lab.tokenizers import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("vae", overrides=["base_channels=8", "ch_mult=[1,2,2]", "num_res_blocks=1",
                                            "perceptual_weight=0"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny-vae"
    tok.save(path)
    return path


def _sets(extra: list[str] = ()) -> list[str]:
    out = []
    for s in [*SMALL, *extra]:
        out += ["--set", s]
    return out


def _assert_one_line_failure(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    for n in needles:
        assert n in err, err


def test_measure_checkpoint_end_to_end(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    res = _run(["measure", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--no-progress",
                *_sets()], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "SSC" in res.stdout and "rFID" in res.stdout
    payload = json.loads((out / "metrics.json").read_text())
    s, m, meta = payload["summary"], payload["metrics"], payload["meta"]
    assert 0.0 <= s["SSC"] <= 1.0
    assert 0.0 <= s["GSQ"] <= 1.0
    assert s["LPC"] > 0.0
    assert 1.0 <= s["eRank"] <= 4.0 + 1e-6  # 4 latent channels
    assert s["rFID"] >= 0.0 and s["PSNR"] > 0.0
    assert set(m["lpc"]["per_rho"]) == {"0.1", "0.5", "1.0", "2.0"}
    assert m["lpc"]["perceptual_distance"] == m["reconstruction"]["perceptual_distance"]
    assert m["reconstruction"]["fid_backbone"].startswith("mobilenet_v2")
    assert m["ssc"]["sigma"] == 0.1 and m["ssc"]["n_images"] > 0
    assert meta["config"]["lpc"]["num_images"] == 16
    assert meta["seed"] == 0 and "torch" in meta["versions"]
    assert set(meta["timing_s"]) >= {"encode / decode", "LPC (perturb + decode)", "SSC (spectral clustering)"}
    for fig in ("tsne", "umap", "lpc", "ssc", "channels", "recon"):
        assert (out / payload["figures"][fig]).stat().st_size > 1000, fig
    report = (out / "report.md").read_text()
    assert "| SSC |" in report and "*Figure 1.*" in report and "Wall time per stage" in report

    # deterministic for a given seed: a second run gives the same numbers
    out2 = tmp_path / "res2"
    res2 = _run(["measure", "--checkpoint", str(tiny_checkpoint), "--out", str(out2), "--no-progress",
                 *_sets(["probes.umap=false", "probes.tsne=false"])], tmp_path)
    assert res2.returncode == 0, res2.stderr
    s2 = json.loads((out2 / "metrics.json").read_text())["summary"]
    for key in ("SSC", "LPC", "GSQ", "eRank", "PSNR", "rFID"):
        assert s2[key] == pytest.approx(s[key], rel=1e-5, abs=1e-7), key


def test_measure_latents_file_encode_only(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    centers = torch.randn(4, 8, generator=g) * 3
    z = centers[labels][:, :, None, None] + 0.3 * torch.randn(200, 8, 4, 4, generator=g)
    segments = torch.zeros(200, 4, 4, dtype=torch.long)
    segments[:, :, 2:] = 1
    save_tensors(tmp_path / "lat.safetensors", {"latents": z, "labels": labels, "segments": segments})
    out = tmp_path / "res"
    res = _run(["measure", "--latents", str(tmp_path / "lat.safetensors"), "--out", str(out), "--no-progress",
                "--set", "probes.umap=false", "--set", "gsq.per_class=None"], tmp_path)
    assert res.returncode == 0, res.stderr
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["summary"]["GSQ"] > 0.95  # well-separated classes
    assert "skipped" in payload["metrics"]["lpc"] and "decoder" in payload["metrics"]["lpc"]["skipped"]
    assert "skipped" in payload["metrics"]["reconstruction"]
    assert payload["summary"]["SSC"] is not None


def test_unknown_tokenizer_is_one_line(tmp_path: Path) -> None:
    res = _run(["measure", "--tokenizer", "nope", "--out", str(tmp_path / "r")], tmp_path)
    _assert_one_line_failure(res, "unknown tokenizer 'nope'", "vae")
    assert not (tmp_path / "r").exists()


def test_corrupt_checkpoint_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 200])
    res = _run(["measure", "--checkpoint", str(bad), "--out", str(tmp_path / "r")], tmp_path)
    _assert_one_line_failure(res, "model.safetensors")
    assert not (tmp_path / "r").exists()


def test_nan_latents_is_one_line(tmp_path: Path) -> None:
    z = torch.randn(10, 4, 2, 2)
    z[3, 1, 0, 0] = float("nan")
    save_tensors(tmp_path / "nan.safetensors", {"latents": z})
    res = _run(["measure", "--latents", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "r")], tmp_path)
    _assert_one_line_failure(res, "NaN")
    assert not (tmp_path / "r").exists()


def test_empty_image_folder_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = _run(["measure", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "empty"),
                "--out", str(tmp_path / "r")], tmp_path)
    _assert_one_line_failure(res, str(tmp_path / "empty"))
    assert not (tmp_path / "r").exists()


def test_unknown_config_key_is_one_line(tmp_path: Path) -> None:
    res = _run(["measure", "--set", "lpc.nope=3", "--out", str(tmp_path / "r")], tmp_path)
    _assert_one_line_failure(res, "lpc.nope", "rhos")


def test_measure_user_image_folder_with_masks(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A user's ImageNet-layout folder at odd resolutions plus instance-mask PNGs: SSC from the masks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (tmp_path / "data" / c).mkdir(parents=True)
        (tmp_path / "masks" / c).mkdir(parents=True)
        for i in range(6):
            h, w = 40 + 3 * i, 36 + 5 * i
            img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            mask[: h // 2] = 1
            img[: h // 2] = (200, 60, 60) if c == "cats" else (60, 60, 200)
            Image.fromarray(img).save(tmp_path / "data" / c / f"{i}.png")
            Image.fromarray(mask).save(tmp_path / "masks" / c / f"{i}.png")
    out = tmp_path / "res"
    res = _run(["measure", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "data"),
                "--masks", str(tmp_path / "masks"), "--out", str(out), "--no-progress",
                "--set", "probes.num_points=12", "--set", "gsq.per_class=null", "--set", "probes.umap=false"],
               tmp_path)
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["ssc"]["n_images"] == 12 and "masks" in m["ssc"]["source"]
    assert m["reconstruction"]["n_images"] == 12
    assert m["probes"]["tsne"]["perplexity"] < 30  # capped for 12 points and recorded
