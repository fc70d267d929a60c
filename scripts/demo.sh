#!/usr/bin/env bash
# Set up everything (virtualenv, package, the real ImageNet VGG16 model) and run the main job
# on the bundled sample photos: extract -> build-index -> search, printing the top matches.
# The model goes where `pipeline` looks for it from any folder ($PIPELINE_MODEL when set, else the
# user data folder, e.g. ~/.local/share/pipeline/models/vgg16.onnx), so the commands work anywhere after it.
set -euo pipefail
case "${PIPELINE_MODEL:-}" in ""|/*|"~"*) ;; *) export PIPELINE_MODEL="$PWD/$PIPELINE_MODEL" ;; esac  # relative: to the caller's folder
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[weights,serve]"   # serve: the quick start ends with `pipeline serve`
export PATH="$PWD/.venv/bin:$PATH"
# Asked from outside the checkout: here a ./models/vgg16.onnx would come first, but not in other folders.
model=$(cd / && python -c 'from pipeline.model import default_model_location; print(default_model_location()[0])')
if [ -f "$model" ]; then
    echo "model: $model (already there; \`pipeline model info\` says what it is)"
else
    (cd / && pipeline model export)
fi
export PIPELINE_MODEL="$model"  # the demo's commands use that file, whatever ./models holds
out=demo-output
rm -rf "$out"  # a fresh run each time (an older run may hold features of another model recipe)
pipeline extract samples/gallery --out "$out/features"
pipeline build-index "$out/features" --out "$out/index"
pipeline search samples/queries/*_crop80.jpg samples/queries/*_mirror.jpg --index "$out/index" -k 4
