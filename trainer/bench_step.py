"""Time one training step of each stage of the dpir-tiny config (forward + backward +
AdamW) on random data, after one warm-up step.

    python3 -m trainer.bench_step [--batch N] [--crop S] [--device cpu|cuda] [--toy]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from .models import DpirModel, Encoder, TinyConfig, Vae, to_scaled, toy_config


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--crop", type=int, default=256)
    a.add_argument("--device", default="cpu")
    a.add_argument("--toy", action="store_true")
    a.add_argument("--reps", type=int, default=2)
    args = a.parse_args()
    dev = torch.device(args.device)
    cfg = toy_config() if args.toy else TinyConfig()
    cuda = dev.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    b, s = args.batch, args.crop
    torch.manual_seed(0)
    vae = Vae(cfg).to(dev)
    rob = Encoder(cfg.vae_channels, cfg.vae_layers, cfg.latent).to(dev)
    model = DpirModel(cfg).to(dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(name, params, fn):
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for i in range(args.reps + 1):
            sync()
            t = time.perf_counter()
            with amp():
                loss = fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()
            if i > 0:
                times.append(time.perf_counter() - t)
        print(f"{name}: {1000 * min(times):.0f} ms/step (batch {b}, crop {s}, {dev})", flush=True)

    x = torch.rand(b, 3, s, s, device=dev) * 2 - 1

    def vae_step():
        mean, _ = vae.encoder(x)
        return (vae.decoder(mean).float() - x).abs().mean()

    def robust_step():
        with torch.no_grad():
            target = vae.encoder(x)[0]
        mean = rob(x)[0]
        return ((mean - target) ** 2).mean() + (vae.decoder(mean).float() - x).abs().mean()

    def dit_step():
        with torch.no_grad():
            z0 = to_scaled(vae.encoder(x)[0].float())
            zl = to_scaled(rob(x)[0].float())
        sigma = torch.rand(b, device=dev)
        eps = torch.randn_like(z0)
        zt = (1 - sigma[:, None, None, None]) * z0 + sigma[:, None, None, None] * eps
        ctx, y = model.prompts(x, x)
        v = model.velocity(zt, 1000 * sigma, zl, ctx, y).float()
        return ((v - (eps - z0)) ** 2).mean()

    timed("vae", list(vae.parameters()), vae_step)
    timed("robust", list(rob.parameters()), robust_step)
    timed("dit", list(model.parameters()), dit_step)


if __name__ == "__main__":
    main()
