"""Where a model's coloured dots come from: latent outliers and the decoder's response to them.

    PYTHONPATH=. python3 -m trainer.latent_outliers MODEL_DIR LQ_IMAGE [--scale 4]

Encodes the bicubic-upscaled LQ image with the model's robust encoder (as `dpir restore`
does before sampling), reports the scaled latent's largest |z| and where it sits, then
decodes and prints, block by block through the decoder, the largest activation magnitude
next to the median one and the largest within two latent cells of that position. A dot is
a position where that ratio grows through the blocks to hundreds: with GroupNorm, one huge
activation dominates its group's statistics, and the last norm turns it into a saturated
disc of colour (StyleGAN2's "droplet" mechanism).
"""
import argparse

import numpy as np
import torch
from PIL import Image

from . import data as D
from .export import load_components
from .models import TinyConfig, to_scaled
from .train import State


@torch.no_grad()
def trace(model: str, image: str, scale: int = 4) -> dict:
    """{"z": scaled latent, "at": (channel, y, x) of its largest |z|, "rows": [(name, shape,
    max, max within two latent cells of "at", median)] for each decoder block}"""
    st = State(TinyConfig(), torch.device("cpu"), 0)
    load_components(st, model)
    rgb = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 127.5 - 1
    x = D.upscale(torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous(), scale)
    m = st.robust(x)[0]
    z = to_scaled(m)
    c, y0, x0 = (int(v) for v in np.unravel_index(z[0].abs().argmax().item(), z[0].shape))
    rows = []

    def row(name, h):
        a = h.abs().amax(1)[0]
        s = a.shape[0] // z.shape[2]
        near = a[max(0, (y0 - 2) * s):(y0 + 3) * s, max(0, (x0 - 2) * s):(x0 + 3) * s].max()
        rows.append((name, tuple(h.shape[1:]), a.max().item(), near.item(), a.median().item()))

    # Hooks on the decoder's blocks, in the order its forward runs them: the decoder itself
    # computes, this only records. Labels: conv_in, mid.block_1, up3.block0, up3.upsample, ...
    dec = st.vae.decoder
    hooks = []
    for name, mod in dec.named_modules():
        parts = name.split(".")
        if name == "norm_out":
            label = "norm_out + SiLU"
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, out, label=label: row(label, torch.nn.functional.silu(out))))
            continue
        if name in ("conv_in", "mid.block_1", "mid.attn_1", "mid.block_2"):
            label = name
        elif parts[0] == "up" and len(parts) == 4 and parts[2] == "block":
            label = f"up{parts[1]}.block{parts[3]}"
        elif parts[0] == "up" and len(parts) == 3 and parts[2] == "upsample":
            label = f"up{parts[1]}.upsample"
        else:
            continue
        hooks.append(mod.register_forward_hook(
            lambda _m, _i, out, label=label: row(label, out)))
    try:
        dec(m)
    finally:
        for hk in hooks:
            hk.remove()
    return {"z": z, "at": (c, y0, x0), "rows": rows}


def main(argv=None) -> int:
    a = argparse.ArgumentParser(prog="python3 -m trainer.latent_outliers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("model")
    a.add_argument("image")
    a.add_argument("--scale", type=int, default=4)
    args = a.parse_args(argv)
    t = trace(args.model, args.image, args.scale)
    z, (c, y0, x0) = t["z"], t["at"]
    print(f"scaled latent {tuple(z.shape[1:])}: max |z| {z.abs().max():.1f} at channel {c}, "
          f"cell ({y0}, {x0}) = pixel ~({8 * y0 + 4}, {8 * x0 + 4}); std {z.std():.2f}; "
          f"{(z.abs() > 4).float().mean() * 100:.2f}% of values beyond 4")
    for name, shape, mx, near, med in t["rows"]:
        print(f"  {name:18s} {shape!s:18s} max {mx:8.1f}  near it {near:8.1f}"
              f"  median {med:6.2f}  max/median {mx / med:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
