#!/usr/bin/env bash
# Make the compact dpir-tiny training set in dist/train-data/ (ignored by git):
# the photos of train/ and train_lowres/, downscaled with antialiasing (2x for the large
# ones, then to at most MAX_SIDE px on the long side, default 1280) and re-encoded as JPEG
# (QUALITY 85, 4:2:0; about 13 MB for 98 photos). Images whose short side would be under
# 512 px are left out (the trainer cuts 512 crops). The val/ photos go the same way into
# OUT_DIR-val (about 1.4 MB), for the trainer's end-of-run check (--val).
# The sizes matter: this set travels to the GPU machine with the working tree (43 MB with
# the bundled model) and the device bundle (5 MB) under a 64 MiB limit.
#   scripts/prepare-train-data.sh [PHOTO_ROOT] [OUT_DIR]
# PHOTO_ROOT defaults to ../shared/data/photos; needs Python 3 with Pillow (PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/data/photos}"
out="${2:-dist/train-data}"
py="${PYTHON:-python3}"
max_side="${MAX_SIDE:-1280}"
quality="${QUALITY:-85}"
[[ -d "$src/train" ]] || { echo "error: no train/ folder in $src" >&2; exit 1; }
rm -rf "$out" "$out-val"
mkdir -p "$out" "$out-val"
prepare() {
"$py" - "$src" "$1" "$max_side" "$quality" "$2" <<'PY'
import glob, os, sys
from PIL import Image
src, out, max_side, quality = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kept = skipped = 0
for sub in sys.argv[5].split(","):
    for path in sorted(glob.glob(os.path.join(src, sub, "*"))):
        try:
            im = Image.open(path).convert("RGB")
        except OSError as e:
            print(f"skip {path}: {e}")
            continue
        w, h = im.size
        f = 2.0 if min(w, h) >= 1200 else 1.0
        f = max(f, max(w, h) / max_side)
        if f > 1.0:
            im = im.resize((round(w / f), round(h / f)), Image.LANCZOS)
        if min(im.size) < 512:
            skipped += 1
            continue
        name = f"{sub}__{os.path.splitext(os.path.basename(path))[0]}.jpg"
        im.save(os.path.join(out, name), quality=quality)
        kept += 1
print(f"{out}: {kept} photos written, {skipped} smaller than 512 px left out")
PY
}
prepare "$out" train,train_lowres
prepare "$out-val" val
du -sh "$out" "$out-val"
