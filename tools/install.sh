#!/usr/bin/env bash
# Installs keras_lcmae with its three backends and test references, plus the
# offline demo data (Debian's real Fashion-MNIST) when it is missing.
# torch is pinned to the CPU wheel these machines carry; elsewhere pick the
# torch build you want first (pip keeps an installed torch >= 2.1).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ ! -f "$HOME/.keras/datasets/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "warning: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist'" >&2
  fi
fi
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q "$TORCH_SPEC" -e ".[jax,test]"
