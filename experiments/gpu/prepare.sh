#!/usr/bin/env bash
# Run HERE (not on the GPU machine): fetch the wheels the GPU machine's image lacks into .gpu-wheels/
# (ignored by git; name it in the device tool's `carry`). The image has torch, triton, numba, h5py, safetensors,
# transformers, click, rich, scipy and pytest-benchmark; sensq also needs diffusers and google-re2.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu-wheels
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu-wheels \
    "diffusers>=0.42,<1" "google-re2>=1.1"
grep -qx '/.gpu-wheels/' .git/info/exclude 2>/dev/null || echo '/.gpu-wheels/' >> .git/info/exclude
ls -la .gpu-wheels
