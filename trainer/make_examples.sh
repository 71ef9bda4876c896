#!/usr/bin/env bash
# Make the bundled example LQ images in examples/: 512x512 crops of CC0 budgie-backgrounds
# photos (after a 2x antialiased downscale), degraded to 128x128 by `dpir degrade`
# (light preset, seed 7), so `dpir restore examples/*.png` shows a 128 -> 512 restore.
#   trainer/make_examples.sh [PHOTO_ROOT]   (DPIR=path/to/dpir, PYTHON=python with Pillow)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/data/photos}/train"
dpir="${DPIR:-target/release/dpir}"
py="${PYTHON:-python3}"
[[ -x "$dpir" ]] || { echo "error: no dpir binary at $dpir (cargo build --release -p dpir-cli)" >&2; exit 1; }
hq=$(mktemp -d)
trap 'rm -rf "$hq"' EXIT
"$py" - "$src" "$hq" <<'PY'
import os, sys
from PIL import Image
src, out = sys.argv[1], sys.argv[2]
# (photo, x, y) of the 512 crop in the 2x-downscaled photo
crops = [("perched-osprey", 464, 272), ("oakland-zoo-otters", 400, 200),
         ("canyon-wren", 512, 104), ("casa-mila", 224, 560)]
for name, x, y in crops:
    im = Image.open(os.path.join(src, f"budgie-backgrounds__{name}.jpg")).convert("RGB")
    im = im.resize((im.width // 2, im.height // 2), Image.LANCZOS)
    im.crop((x, y, x + 512, y + 512)).save(os.path.join(out, f"{name}.png"))
PY
mkdir -p examples
"$dpir" degrade --preset light --scale 4 --seed 7 "$hq" -o examples
ls -la examples
