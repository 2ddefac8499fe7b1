#!/usr/bin/env bash
# Sets up a fresh machine for keras_resmem: the Fashion-MNIST data (Debian
# package) and a Python 3.11 virtual environment in .venv with the package,
# its pinned TensorFlow/ScaNN pair, and the test/lint/example tools.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
FASHION_MNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

if [ ! -f "$FASHION_MNIST" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "No apt-get: the loader will fall back to keras.datasets (needs the network)." >&2
  fi
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "keras_resmem needs Python 3.11 ($PYTHON not found; set PYTHON=...)." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $PYTHON..."
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import keras_resmem, scann.scann_ops.py.scann_ops" 2>/dev/null \
  || { echo "keras_resmem or ScaNN's TensorFlow ops failed to import." >&2; exit 1; }
echo "Set up: .venv ($(.venv/bin/python --version), keras_resmem $(.venv/bin/python -c 'import keras_resmem; print(keras_resmem.__version__)'))"
