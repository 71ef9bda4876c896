"""Write MODEL_CARD.md for a trained dpir-tiny from its files and losses.json.

    python3 -m trainer.model_card MODEL_DIR [--machine TEXT] [--losses PATH]
        [--finetune LOSSES=MACHINE ...]

Reads MODEL_DIR/*.safetensors (sizes, tensor counts) and losses.json (steps, seconds,
device, final losses) of the run that trained the model, then the losses.json of each
fine-tune that continued from it (`--init-from`), in order. Quality numbers live in
docs/RESULTS.md and are linked, not copied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .export import FILES


def summarise(curve: list, keys=("loss",), n: int = 1) -> str:
    """`key first → last` for each key, each side the mean of n logged windows."""
    if not curve:
        return "not trained"
    n = max(1, min(n, len(curve) // 2 or 1))
    parts = []
    for k in keys:
        head = [c[k] for c in curve[:n] if k in c]
        tail = [c[k] for c in curve[-n:] if k in c]
        if head and tail:
            parts.append(f"{k} {sum(head) / len(head):.4f} → {sum(tail) / len(tail):.4f}")
    return ", ".join(parts)


STAGE_NAMES = {"vae": "VAE", "robust": "robust encoder", "dit": "MMDiT stage"}
CURVE_KEYS = {"vae": ("loss", "psnr", "psnr_lq"), "robust": ("latent", "pix_l1"),
              "dit": ("loss",)}


def what_trained(run: dict, stage: str) -> str:
    if stage == "vae" and run.get("vae_decoder_only"):
        text = "VAE decoder only (encoders frozen)"
    elif stage == "robust":
        text = "robust encoder (VAE frozen)"
    else:
        text = STAGE_NAMES.get(stage, stage)
    extra = [f"{run['crop']}² crops"] if run.get("crop") else []
    batch = run.get("batch_dit" if stage == "dit" else "batch_vae")
    if batch:
        extra.append(f"batch {batch}")
    lr = run.get({"vae": "lr_vae", "robust": "lr_robust", "dit": "lr_dit"}.get(stage, ""))
    if lr:
        extra.append(f"lr {lr:g}" + (f", falling to 0 over the last {run['cooldown']:g} min"
                                     if run.get("cooldown") else ""))
    if run.get("worst_pixels") and stage == "vae":
        extra.append(f"worst-pixel loss {run['worst_pixels']:g}")
    return text + (f" ({', '.join(extra)})" if extra else "")


def finetune_lines(spec: str, index: int) -> list:
    """Model-card lines for one fine-tune: `LOSSES=MACHINE`."""
    path, _, machine = spec.partition("=")
    with open(path) as f:
        L = json.load(f)
    run = L.get("run", {})
    lines = []
    for stage, steps in L["steps"].items():
        if not steps:
            continue
        curve = L.get("curves", {}).get(stage, [])
        lines.append(f"- Fine-tune {index} on {machine or L.get('device', 'unknown')}: "
                     f"{what_trained(run, stage)}, {steps} steps / "
                     f"{L['seconds'].get(stage, 0) / 60:.0f} min; "
                     f"{summarise(curve, CURVE_KEYS.get(stage, ('loss',)), n=8)} "
                     "(means of the first and last 8 logged windows) "
                     f"(`{os.path.basename(path)}`).")
    return lines


def main(argv=None) -> int:
    a = argparse.ArgumentParser()
    a.add_argument("model_dir")
    a.add_argument("--losses", default=None)
    a.add_argument("--machine", default=None)
    a.add_argument("--finetune", action="append", default=[], metavar="LOSSES=MACHINE",
                   help="losses.json of a run that continued from the model (repeatable)")
    args = a.parse_args(argv)
    d = args.model_dir
    lpath = args.losses or os.path.join(d, "losses.json")
    try:
        with open(lpath) as f:
            L = json.load(f)
    except (OSError, ValueError) as e:
        print(f"error: cannot read {lpath}: {e}", file=sys.stderr)
        return 1
    cfg, steps, secs = L["config"], L["steps"], L["seconds"]
    cfg.setdefault("hidden", 64 * cfg["depth"])
    machine = args.machine or L.get("device", "unknown")
    curves = L.get("curves", {})
    rows = []
    total = 0
    for name in FILES:
        p = os.path.join(d, name)
        size = os.path.getsize(p) if os.path.exists(p) else 0
        total += size
        rows.append(f"| `{name}` | {size / 1e6:.1f} MB |")
    vae_last = curves.get("vae", [{}])[-1] if curves.get("vae") else {}
    fine = []
    try:
        for i, spec in enumerate(args.finetune, 1):
            fine += finetune_lines(spec, i)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read fine-tune losses: {e}", file=sys.stderr)
        return 1
    if fine:
        fine.insert(0, "- Fine-tunes, each continuing from the previous one's weights "
                       "(`--init-from`; how they were run: `trainer/README.md`):")
    fine_text = ("\n" + "\n".join(fine)) if fine else ""
    text = f"""# dpir-tiny

A small DPIR (Dual Prompting Image Restoration with Diffusion Transformers) trained from
scratch by this project (`trainer/`), in the same architecture family as the real model:
SD3 MMDiT backbone + LQ branch with adaptive feature alignment + CLIP-vision dual prompts,
an SD3-layout VAE and a degradation-robust encoder. It exists so that `dpir restore` works
on a fresh machine; it is tiny and briefly trained, so expect modest quality.

## Files

| file | size |
|---|---|
{chr(10).join(rows)}
| total | {total / 1e6:.1f} MB |

f16 storage, real checkpoint layouts (SD3 original MMDiT, LDM/SD3 VAE, Hugging Face CLIP
vision, DPIR's own names). VAE latent normalisation: scale 1.5305, shift 0.0609 (SD3's; the
VAE was trained to match them).

## Architecture

- MMDiT: depth {cfg['depth']}, hidden {cfg['hidden']}, {cfg['depth']} heads of
  {cfg['hidden'] // cfg['depth']}, MLP {cfg['mlp_hidden']}, patch {cfg['patch']}, pos-embed
  {cfg['pos_max']}² (fixed 2-D sin-cos), context {cfg['context_dim']}, pooled {cfg['pooled_dim']}.
- VAE: channels {cfg['vae_channels']}, {cfg['vae_layers']} ResNets per level, {cfg['latent']}
  latent channels, f{2 ** (len(cfg['vae_channels']) - 1)}.
- CLIP vision: width {cfg['clip_width']}, {cfg['clip_layers']} layers, {cfg['clip_heads']} heads,
  patch {cfg['clip_patch']}, image {cfg['clip_image']}.
- LQ branch: {cfg['lq_channels']} channels, {cfg['lq_convs']} convs; prompt MLPs
  {cfg['clip_width']}→{cfg['local_hidden']}→{cfg['context_dim']} (local),
  {cfg['clip_width']}→{cfg['global_hidden']}→{cfg['pooled_dim']} (global).

## Training

- Data: `scripts/prepare-train-data.sh` (the project's open photo set, train/ and
  train_lowres/, downscaled), LQ/HQ pairs from `dpir degrade` (standard and light presets,
  512² HQ regions, ×4); see `trainer/README.md`.
- Machine: {machine}.
- Steps and wall time per stage: VAE {steps.get('vae', 0)} steps / {secs.get('vae', 0):.0f} s,
  robust encoder {steps.get('robust', 0)} / {secs.get('robust', 0):.0f} s,
  MMDiT stage {steps.get('dit', 0)} / {secs.get('dit', 0):.0f} s.
- Losses (first → last logged window): VAE {summarise(curves.get('vae', []), ('loss', 'psnr'))};
  robust {summarise(curves.get('robust', []), ('latent', 'pix_l1'))};
  MMDiT {summarise(curves.get('dit', []))}.
- Final VAE reconstruction PSNR on training crops: {vae_last.get('psnr', float('nan')):.2f} dB.{fine_text}

## Use

Default sampler settings are the CLI's (`dpir restore --help`); quality against bicubic
on the validation photos, with the commands that measure it, is in `docs/RESULTS.md`.

## Licence and data

Weights trained only on the photos listed in `shared/data/photos/manifest.tsv`
(wallpaper and game-data packages; CC0, CC-BY, CC-BY-SA, GPL-2+, LGPL-2.1+ per file).
"""
    with open(os.path.join(d, "MODEL_CARD.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(d, 'MODEL_CARD.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
