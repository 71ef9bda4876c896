"""Write the HQ 512x512 crops behind the bundled examples (after a 2x antialiased downscale
of CC0 budgie-backgrounds photos) into a folder, as PNG.

    python3 trainer/example_crops.py PHOTO_TRAIN_DIR OUT_DIR
"""
import os
import sys

from PIL import Image

# (photo, x, y) of the 512 crop in the 2x-downscaled photo
CROPS = [("perched-osprey", 464, 272), ("oakland-zoo-otters", 400, 200),
         ("canyon-wren", 512, 104), ("casa-mila", 224, 560)]


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for name, x, y in CROPS:
        im = Image.open(os.path.join(src, f"budgie-backgrounds__{name}.jpg")).convert("RGB")
        im = im.resize((im.width // 2, im.height // 2), Image.LANCZOS)
        im.crop((x, y, x + 512, y + 512)).save(os.path.join(out, f"{name}.png"))


if __name__ == "__main__":
    main()
