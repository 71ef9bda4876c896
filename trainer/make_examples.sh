#!/usr/bin/env bash
# Make the bundled example LQ images in examples/: 512x512 crops of CC0 budgie-backgrounds
# photos (after a 2x antialiased downscale; trainer/example_crops.py), degraded to 128x128 by
# `dpir degrade` (PRESET, default standard: the Real-ESRGAN pipeline DPIR is for; seed 7),
# so `dpir restore examples` shows a 128 -> 512 restore.
#   trainer/make_examples.sh [PHOTO_ROOT]   (DPIR=path/to/dpir, PYTHON=python with Pillow)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/data/photos}/train"
dpir="${DPIR:-target/release/dpir}"
py="${PYTHON:-python3}"
preset="${PRESET:-standard}"
[[ -x "$dpir" ]] || { echo "error: no dpir binary at $dpir (cargo build --release -p dpir-cli)" >&2; exit 1; }
hq=$(mktemp -d)
trap 'rm -rf "$hq"' EXIT
"$py" trainer/example_crops.py "$src" "$hq"
mkdir -p examples
"$dpir" degrade --preset "$preset" --scale 4 --seed 7 "$hq" -o examples
ls -la examples
