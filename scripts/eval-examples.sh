#!/usr/bin/env bash
# Score the README's main command on the bundled examples: restore examples/ with the
# bundled model (CLI defaults) and compare with bicubic x4, both against the HQ crops the
# examples were cut from (remade from the photos by trainer/example_crops.py). Y-channel
# PSNR/SSIM, 4-px border (`dpir compare`). The photos are in dpir-tiny's training set, so
# this shows the command at work; docs/RESULTS.md measures on held-out photos.
#   scripts/eval-examples.sh [PHOTO_ROOT]   (PYTHON=python with Pillow; MODEL=DIR scores
#                                           another model folder instead of the bundled one)
set -euo pipefail
root="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
cd "$root"
src="${1:-../shared/data/photos}/train"
py="${PYTHON:-python3}"
[[ -d "$src" ]] || { echo "error: $src: photo folder not found" >&2; exit 1; }
cargo build --release -p dpir-cli >&2
dpir="$root/target/release/dpir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" trainer/example_crops.py "$src" "$work/hq"
model=()
[[ -n "${MODEL:-}" ]] && model=(--model "$MODEL")
"$dpir" restore "${model[@]}" examples -o "$work/out" >&2
echo "dpir-tiny (CLI defaults):"
"$dpir" compare "$work/hq" "$work/out"
echo "bicubic x4:"
"$dpir" compare --bicubic 4 "$work/hq" examples
