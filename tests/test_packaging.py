"""The installed distribution exposes only `manifold_lab`; `tokenizers/` is never a top-level module."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (whl,) = out.glob("manifold_lab-*.whl")
    return whl


def test_wheel_has_no_top_level_name_but_manifold_lab(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"manifold_lab"}, top
    assert any(n.startswith("manifold_lab/tokenizers/__init__.py") for n in names)
    assert any(n.startswith("manifold_lab/tokenizers/vae.py") for n in names)
    assert any(n.endswith("recipes/vae_cpu.yaml") for n in names), "recipes must ship as package data"
    dist_info = next(n for n in names if n.endswith(".dist-info/RECORD")).rsplit("/", 1)[0]
    top_level = f"{dist_info}/top_level.txt"
    if top_level in names:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["manifold_lab"]


def test_installed_package_does_not_shadow_hugging_face_tokenizers(tmp_path: Path) -> None:
    code = (
        "import importlib.util, manifold_lab.tokenizers as t;"
        "spec = importlib.util.find_spec('tokenizers');"
        "print(t.__name__);"
        "print('none' if spec is None else spec.origin)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    name, origin = res.stdout.split()
    assert name == "manifold_lab.tokenizers"
    # either Hugging Face's package or nothing, but never our folder
    assert origin == "none" or not origin.startswith(str(ROOT / "tokenizers"))


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "manifold-lab"
    assert exe.exists()
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "measure" in res.stdout


def test_checkout_folder_refuses_to_be_imported_as_top_level_tokenizers() -> None:
    """Running Python from the checkout root puts tokenizers/ on sys.path; it must not pose as HF's."""
    res = subprocess.run([sys.executable, "-c", "import tokenizers"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "manifold_lab.tokenizers" in res.stderr
