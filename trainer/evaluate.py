"""A quick quality check of a training State in PyTorch, for the training log: fixed
256² crops of held-out photos, degraded ×4 by the stand-in degradation (fixed seed), then
restored as the pipeline does it (bicubic ×4 → robust encoder → MMDiT sampling with the
SD3 shifted schedule → VAE decoder). PSNR (RGB, [0,1]) against the HQ crop, next to
bicubic and to decoding the robust encoder's latent directly. Not a substitute for
docs/RESULTS.md (engine, `dpir degrade` pairs, Y-channel PSNR/SSIM).
"""

from __future__ import annotations

import torch

from . import data as D
from .models import from_scaled


def sd3_sigmas(steps: int, shift: float = 3.0) -> list:
    ts = [1 - i / steps for i in range(steps + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """a, b in [-1,1]; per-image PSNR on [0,1], averaged."""
    mse = (((a.clamp(-1, 1) - b) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


@torch.no_grad()
def restore(st, lq: torch.Tensor, steps: int, strength: float, cfg: float, scale: int,
            g: torch.Generator, amp) -> torch.Tensor:
    model = st.ema if st.steps["dit"] > 0 else st.model
    lq_up = D.upscale(lq, scale)
    enc = st.robust if st.robust_init else st.vae.encoder
    with amp():
        z_lq = ((enc(lq_up)[0].float() - 0.0609) * 1.5305)
        ctx, y = model.prompts(lq_up, lq_up)
    ctx, y = ctx.float(), y.float()
    sig = sd3_sigmas(steps)
    start = next(i for i, s in enumerate(sig) if s <= strength + 1e-9)
    noise = torch.randn(z_lq.shape, generator=g, device=g.device)
    z = (1 - sig[start]) * z_lq + sig[start] * noise
    b = z.shape[0]
    for i in range(start, steps):
        t = torch.full((b,), 1000 * sig[i], device=z.device)
        with amp():
            if cfg == 1.0:
                v = model.velocity(z, t, z_lq, ctx, y).float()
            else:
                v2 = model.velocity(torch.cat([z, z]), torch.cat([t, t]), torch.cat([z_lq, z_lq]),
                                    torch.cat([ctx, torch.zeros_like(ctx)]),
                                    torch.cat([y, torch.zeros_like(y)])).float()
                vc, vu = v2[:b], v2[b:]
                v = vu + cfg * (vc - vu)
        z = z + (sig[i + 1] - sig[i]) * v
    with amp():
        return st.vae.decoder(from_scaled(z)).float()


@torch.no_grad()
def evaluate(st, photos: D.PhotoCrops, device, amp, n: int = 16, scale: int = 4,
             crop: int = 256, should_stop=lambda: False) -> dict:
    g = torch.Generator(device=device)
    g.manual_seed(1234)
    dg = torch.Generator()
    dg.manual_seed(1234)
    hq = photos.batch(dg, n, crop)
    lq = D.synthetic_lq(hq, g, scale)
    bic = D.upscale(lq, scale)
    out = {"bicubic": psnr(bic, hq)}
    with amp():
        z = st.robust(bic)[0].float() if st.robust_init else st.vae.encoder(bic)[0].float()
        out["robust_decode"] = psnr(st.vae.decoder(z).float(), hq)
        out["vae_hq_recon"] = psnr(st.vae.decoder(st.vae.encoder(hq)[0]).float(), hq)
    if st.steps["dit"] > 0:
        # (20, 1.0, 4.0) are the CLI defaults (steps, strength, cfg).
        for steps, strength, cfg in ((20, 1.0, 4.0), (20, 1.0, 1.0), (20, 0.6, 1.0),
                                     (20, 0.6, 4.0)):
            if should_stop():
                break
            r = restore(st, lq, steps, strength, cfg, scale, g, amp)
            out[f"dit_s{steps}_str{strength}_cfg{cfg}"] = psnr(r, hq)
    return {k: round(v, 3) for k, v in out.items()}
