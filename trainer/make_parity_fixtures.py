"""Write tests/fixtures/trainer_parity/: a tiny random dpir model exported exactly as the
trainer exports dpir-tiny (real layouts, f16 storage), plus inputs and the trainer's f32
outputs for every component, so the Rust test can prove the engine computes the same.

    python3 -m trainer.make_parity_fixtures [OUT_DIR]

Files: mmdit/vae/clip_vision/dpir.safetensors (weights), io.safetensors (f32 inputs and
outputs, names below), trainer_config.json (the trainer config the weights were made with; not named
config.json, which the loader would read as a Hugging Face config). The outputs
are computed from the f16-rounded weights in f32, so the engine (which casts f16 to f32)
must match them to float rounding.

io.safetensors:
  mmdit.x [2,16,8,12]  mmdit.t [2]  mmdit.y [2,32]  mmdit.context [2,5,32]
  mmdit.lq_tokens [2,24,64]  (gate: dpir.safetensors lq_align.gate, non-zero)
  mmdit.out [2,16,8,12] (with LQ injection)  mmdit.out_plain (without: plain SD3)
  vae.image [1,3,24,32]  vae.mean [1,16,12,16] (posterior mean)
  vae.z [1,16,12,16] ((mean - 0.0609) * 1.5305)  vae.decoded [1,3,24,32] (decode(vae.z))
  robust.mean / robust.z: the robust encoder on vae.image
  clip.pixels [2,3,32,32] (already CLIP-normalised)  clip.penultimate [2,17,64]
  clip.pooled [2,64] (post_layernorm(cls) of the last layer)
  lq.z [2,16,8,12]  lq.tokens [2,24,64]
  prompt.local_in [2,16,64]  prompt.local_out [2,16,32]
  prompt.global_in [2,64]  prompt.global_out [2,32]
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .export import component_tensors, export_components
from .models import (DpirModel, Encoder, TinyConfig, Vae, VAE_SCALE, VAE_SHIFT, from_scaled,
                     to_scaled)


def parity_config() -> TinyConfig:
    return TinyConfig(vae_channels=[32, 32], vae_layers=1, depth=2, hidden=64, mlp_hidden=96,
                      pos_max=8, context_dim=32, pooled_dim=32, freq_dim=32, clip_width=64,
                      clip_layers=2, clip_heads=1, clip_patch=8, clip_image=32, clip_mlp=128,
                      lq_channels=16, lq_convs=2, local_hidden=48, global_hidden=40)


def _randomise(module: torch.nn.Module, g: torch.Generator) -> None:
    """Every parameter random (norm weights near 1), so no term hides behind a zero init."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layrnorm" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)


def _round_f16(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
        for b in module.buffers():
            b.copy_(b.half().float())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "tests/fixtures/trainer_parity"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    cfg = parity_config()
    vae, robust, model = Vae(cfg), Encoder(cfg.vae_channels, cfg.vae_layers, cfg.latent), DpirModel(cfg)
    for m in (vae, robust, model):
        _randomise(m, g)
        _round_f16(m)
        m.eval()
    export_components(vae, robust, model, cfg, out, dtype=torch.float16)

    io = {}
    with torch.no_grad():
        b, h, w = 2, 8, 12
        x = torch.randn(b, cfg.latent, h, w, generator=g)
        t = torch.tensor([137.5, 861.0])
        y = torch.randn(b, cfg.pooled_dim, generator=g)
        ctx = torch.randn(b, 5, cfg.context_dim, generator=g)
        n = (h // cfg.patch) * (w // cfg.patch)
        tok = torch.randn(b, n, cfg.hidden, generator=g) * 2 + 0.5
        gate = model.dpir.lq_align.gate
        assert gate.abs().min() > 0
        io.update({"mmdit.x": x, "mmdit.t": t, "mmdit.y": y, "mmdit.context": ctx,
                   "mmdit.lq_tokens": tok,
                   "mmdit.out": model.mmdit(x, t, y, ctx, tok, gate),
                   "mmdit.out_plain": model.mmdit(x, t, y, ctx)})

        img = torch.rand(1, 3, 24, 32, generator=g) * 2 - 1
        mean = vae.encoder(img)[0]
        z = to_scaled(mean)
        io.update({"vae.image": img, "vae.mean": mean, "vae.z": z,
                   "vae.decoded": vae.decoder(from_scaled(z))})
        rmean = robust(img)[0]
        io.update({"robust.mean": rmean, "robust.z": to_scaled(rmean)})

        px = torch.randn(2, 3, cfg.clip_image, cfg.clip_image, generator=g)
        pen, pooled = model.clip(px)
        io.update({"clip.pixels": px, "clip.penultimate": pen, "clip.pooled": pooled})

        zl = torch.randn(b, cfg.latent, h, w, generator=g)
        io.update({"lq.z": zl, "lq.tokens": model.dpir.lq_branch(zl)})

        li = torch.randn(2, 16, cfg.clip_width, generator=g)
        gi = torch.randn(2, cfg.clip_width, generator=g)
        io.update({"prompt.local_in": li, "prompt.local_out": model.dpir.local_prompt(li),
                   "prompt.global_in": gi, "prompt.global_out": model.dpir.global_prompt(gi)})

    from safetensors.torch import save_file
    save_file({k: v.contiguous().float() for k, v in io.items()},
              os.path.join(out, "io.safetensors"),
              metadata={"vae_scaling_factor": str(VAE_SCALE), "vae_shift_factor": str(VAE_SHIFT)})
    with open(os.path.join(out, "trainer_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
        f.write("\n")
    # Sanity: the exported files hold exactly the weights used above.
    from safetensors.torch import load_file
    for fname, tensors in component_tensors(vae, robust, model).items():
        saved = load_file(os.path.join(out, fname))
        for k, v in tensors.items():
            assert torch.equal(saved[k].float(), v.float()), k
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
