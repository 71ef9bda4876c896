"""Train dpir-tiny: (1) VAE, (2) degradation-robust encoder, (3) MMDiT + LQ branch +
CLIP-vision encoder + prompt adapters (SD3 flow matching).

    python3 -m trainer.train --data DIR [--pairs DIR] --out DIR [--work DIR]
                             [--minutes M | --steps N] [--stage all|vae|robust|dit]

Every stage resumes from `WORK/state.pt` (written atomically every --ckpt-every seconds
and at the end of each stage), and the model files are exported into OUT every
--export-every seconds, so a run killed at any moment leaves a usable model and loses at
most a minute of training. With --steps the run is deterministic (the resume test uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time

import torch

from . import data as D
from .export import export_all, load_components
from .models import (DpirModel, Encoder, TinyConfig, Vae, param_count, to_scaled,
                     toy_config, VAE_SCALE, VAE_SHIFT)

STAGES = ("vae", "robust", "dit")
DEFAULT_SPLIT = {"vae": 0.35, "robust": 0.15, "dit": 0.50}
PAIRS_FULL = 1000


def lr_factor(step: int, warmup: int, now: float, deadline, cooldown_s: float) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup` steps, then 1, falling linearly
    to 0 over the last `cooldown_s` seconds before the stage's deadline. It depends only on
    the step and the clock, so a resumed run follows the same schedule."""
    f = min(1.0, (step + 1) / warmup)
    if deadline is not None and cooldown_s > 0:
        f *= min(1.0, max(0.0, (deadline - now) / cooldown_s))
    return f


# The flags that say what a run trained, recorded in losses.json.
RUN_KEYS = ("stage", "vae_decoder_only", "init_from", "crop", "batch_vae", "batch_dit",
            "lr_vae", "lr_robust", "lr_dit", "cooldown", "worst_pixels")


# The share of pixels per image that --worst-pixels averages over.
WORST_FRAC = 0.005


def worst_pixels(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over images of the mean L1 error (over channels) of each image's worst
    ceil(WORST_FRAC * H * W) pixels. rec, target: [B, C, H, W]."""
    e = (rec - target).abs().mean(dim=1).flatten(1)
    k = max(1, math.ceil(WORST_FRAC * e.shape[1]))
    return e.topk(k, dim=1).values.mean()


def now() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())


class Log:
    def __init__(self, path: str | None, echo: bool = True):
        self.f = open(path, "a", buffering=1) if path else None
        self.echo = echo

    def __call__(self, msg: str) -> None:
        line = f"[{now()}] {msg}"
        if self.echo:
            print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")


def parse_args(argv=None):
    a = argparse.ArgumentParser(prog="python3 -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--data", required=True, help="folder of HQ photos")
    a.add_argument("--pairs", default=None,
                   help="folder with hq/ and lq/ pairs from `dpir degrade` (may still grow)")
    a.add_argument("--out", required=True, help="where the model files, log and losses go")
    a.add_argument("--work", default=None, help="checkpoint folder (default OUT/work)")
    a.add_argument("--stage", default="all", choices=("all",) + STAGES)
    a.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    a.add_argument("--until", type=float, default=None,
                   help="wall-clock deadline as a Unix time (instead of --minutes)")
    a.add_argument("--steps", type=int, default=None,
                   help="train each selected stage up to this many steps (deterministic)")
    a.add_argument("--split", default=None,
                   help="budget shares vae,robust,dit (default 0.35,0.15,0.5)")
    a.add_argument("--toy", action="store_true", help="tiny test config")
    a.add_argument("--device", default=None)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--crop", type=int, default=256, help="HQ crop (local view) size")
    a.add_argument("--batch-vae", type=int, default=None)
    a.add_argument("--batch-dit", type=int, default=None)
    a.add_argument("--lr-vae", type=float, default=4e-4)
    a.add_argument("--vae-decoder-only", action="store_true",
                   help="VAE stage trains the decoder alone, on the frozen encoder's latents of "
                        "HQ crops and (every other step, once a robust encoder exists) the "
                        "robust encoder's latents of LQ images against their HQ: the latent "
                        "space, and so the MMDiT and robust encoder, stay valid")
    a.add_argument("--lr-robust", type=float, default=2e-4)
    a.add_argument("--lr-dit", type=float, default=3e-4)
    a.add_argument("--cooldown", type=float, default=0.0, metavar="MIN",
                   help="over a timed stage's last MIN minutes the learning rate falls "
                        "linearly to 0 (a fine-tune ends on settled weights)")
    a.add_argument("--worst-pixels", type=float, default=0.0, metavar="W",
                   help="VAE stage: add W times the mean L1 error of each image's worst "
                        "0.5%% of pixels to the loss (rare, large errors such as coloured "
                        "dots weigh little in a plain mean); 0 (default) leaves it out")
    a.add_argument("--scale", type=int, default=4)
    a.add_argument("--ckpt-every", type=float, default=60.0, help="seconds")
    a.add_argument("--export-every", type=float, default=60.0, help="seconds")
    a.add_argument("--log-every", type=int, default=25, help="steps")
    a.add_argument("--no-export", action="store_true")
    a.add_argument("--quiet", action="store_true", help="log to OUT/train.log only")
    a.add_argument("--val", default=None,
                   help="held-out photos: PSNR of a quick restore at the end (train.log, losses.json)")
    a.add_argument("--init-from", default=None,
                   help="start from exported model files in this folder (when no checkpoint)")
    a.add_argument("--no-channels-last", action="store_true",
                   help="keep NCHW convolutions on CUDA")
    a.add_argument("--compile", action="store_true", help="torch.compile the MMDiT")
    return a.parse_args(argv)


class State:
    """Everything a run needs to resume: weights, optimizer, steps, RNG."""

    def __init__(self, cfg: TinyConfig, device: torch.device, seed: int):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.vae = Vae(cfg).to(device)
        self.robust = Encoder(cfg.vae_channels, cfg.vae_layers, cfg.latent).to(device)
        self.model = DpirModel(cfg).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.steps = {s: 0 for s in STAGES}
        self.done = {s: False for s in STAGES}
        self.robust_init = False
        self.opt_stage = None
        self.opt_state = None
        self.losses = {s: [] for s in STAGES}
        self.losses["eval"] = []
        # Noise and timesteps on the device; crop positions and picks on the CPU (no syncs).
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.data_gen = torch.Generator()
        self.data_gen.manual_seed(seed + 1)
        self.elapsed = {s: 0.0 for s in STAGES}

    def to_dict(self, opt) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "vae": self.vae.state_dict(),
            "robust": self.robust.state_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "steps": self.steps, "done": self.done, "robust_init": self.robust_init,
            "opt_stage": self.opt_stage,
            "opt": opt.state_dict() if opt is not None else None,
            "losses": self.losses, "elapsed": self.elapsed,
            "gen": self.gen.get_state(), "data_gen": self.data_gen.get_state(),
        }

    def load(self, d: dict) -> None:
        self.vae.load_state_dict(d["vae"])
        self.robust.load_state_dict(d["robust"])
        self.model.load_state_dict(d["model"])
        self.ema.load_state_dict(d["ema"])
        self.steps, self.done = d["steps"], d["done"]
        self.robust_init = d["robust_init"]
        self.opt_stage, self.opt_state = d["opt_stage"], d["opt"]
        self.losses, self.elapsed = d["losses"], d["elapsed"]
        self.gen.set_state(d["gen"].to("cpu"))
        self.data_gen.set_state(d["data_gen"].to("cpu"))


def save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Runner:
    def __init__(self, args, log: Log):
        self.args = args
        self.log = log
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.cfg = toy_config() if args.toy else TinyConfig()
        self.work = args.work or os.path.join(args.out, "work")
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(args.out, exist_ok=True)
        self.ckpt = os.path.join(self.work, "state.pt")
        self.st = State(self.cfg, self.device, args.seed)
        if os.path.exists(self.ckpt):
            try:
                saved = torch.load(self.ckpt, map_location=self.device, weights_only=False)
                if saved.get("config") != self.cfg.to_dict():
                    raise ValueError("checkpoint config differs from this run's")
                self.st.load(saved)
                log(f"resumed from {self.ckpt}: steps {self.st.steps}, done {self.st.done}")
            except Exception as e:  # an unreadable checkpoint must not stop training
                log(f"warning: cannot resume from {self.ckpt} ({e}); starting fresh")
        elif args.init_from:
            try:
                got = load_components(self.st, args.init_from)
                log(f"initialised from {args.init_from}: {', '.join(got) or 'nothing found'}")
            except Exception as e:
                log(f"warning: cannot initialise from {args.init_from} ({e}); starting fresh")
        self.stop = False
        # NHWC convolutions run on the tensor cores in bf16; CPU runs keep NCHW.
        self.cl = self.cuda and not args.no_channels_last
        if self.cl:
            for m in (self.st.vae, self.st.robust, self.st.model.dpir.lq_branch):
                m.to(memory_format=torch.channels_last)
        self.bs_vae = args.batch_vae or (24 if self.cuda else 2)
        self.bs_dit = args.batch_dit or (64 if self.cuda else 2)
        self.crop = args.crop
        self.big = 2 * args.crop  # the surrounding region for the global view
        self.photos = None
        self.pairs = None
        self.last_export = time.time()
        self.last_ckpt = time.time()

    # -- data ------------------------------------------------------------------------------
    def get_photos(self) -> D.PhotoCrops:
        if self.photos is None:
            t = time.time()
            self.photos = D.PhotoCrops(self.args.data, self.device, self.big)
            self.log(f"data: {len(self.photos.images)} photos from {self.args.data} "
                     f"({time.time() - t:.1f} s)")
        return self.photos

    def get_pairs(self) -> D.PairStore | None:
        if self.args.pairs is None:
            return None
        if self.pairs is None:
            timed = self.args.steps is None
            self.pairs = D.PairStore(self.args.pairs, self.args.scale,
                                     initial=256 if timed else None)
            if self.args.steps is None:
                self.pairs.start_background()
            self.log(f"data: {len(self.pairs)} pairs in {self.args.pairs} at start")
        return self.pairs

    def lq_batch(self, n: int):
        """(hq_local, lq_local, lq_global) in [-1,1]: from `dpir degrade` pairs when enough
        exist, else HQ crops with the on-device stand-in degradation."""
        g, dg = self.st.gen, self.st.data_gen
        pairs = self.get_pairs()
        if pairs is not None:
            pairs.refresh()
            # While few pairs exist, mostly the stand-in degradation (no over-fitting to a
            # handful of pairs); all pairs from PAIRS_FULL on.
            share = min(1.0, len(pairs) / PAIRS_FULL) if len(pairs) >= 32 else 0.0
            if share > 0 and torch.rand(1, generator=dg).item() < share:
                return pairs.batch(dg, n, self.crop, self.device)
        s = self.args.scale
        big = self.get_photos().batch(dg, n, self.big)
        lq_big = D.synthetic_lq(big, g, s)
        y = D.randint(dg, (self.big - self.crop) // 8 + 1) * 8
        x = D.randint(dg, (self.big - self.crop) // 8 + 1) * 8
        hq = big[:, :, y:y + self.crop, x:x + self.crop]
        lq = lq_big[:, :, y // s:(y + self.crop) // s, x // s:(x + self.crop) // s]
        return hq, lq, lq_big

    # -- bookkeeping -----------------------------------------------------------------------
    def checkpoint(self, opt, force=False):
        if force or time.time() - self.last_ckpt >= self.args.ckpt_every:
            t = time.time()
            save_atomic(self.st.to_dict(opt), self.ckpt)
            self.last_ckpt = time.time()
            self.log(f"checkpoint written ({time.time() - t:.1f} s)")

    def export(self, force=False):
        if self.args.no_export:
            return
        if force or time.time() - self.last_export >= self.args.export_every:
            t = time.time()
            export_all(self.st, self.args.out)
            self.write_losses()
            self.last_export = time.time()
            self.log(f"model exported to {self.args.out} ({time.time() - t:.1f} s)")

    def write_losses(self):
        path = os.path.join(self.args.out, "losses.json")
        summary = {
            "config": self.cfg.to_dict(),
            "steps": self.st.steps, "done": self.st.done, "seconds": self.st.elapsed,
            "device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
            # What this run was, for the model card (`trainer.model_card --finetune`).
            "run": {k: getattr(self.args, k) for k in RUN_KEYS},
            "curves": self.st.losses,
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, path)

    def make_opt(self, stage, params, lr):
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0,
                                fused=self.cuda)
        if self.st.opt_stage == stage and self.st.opt_state is not None:
            opt.load_state_dict(self.st.opt_state)
        self.st.opt_stage = stage
        self.st.opt_state = None
        return opt

    def finished(self, stage, deadline) -> bool:
        if self.stop:
            return True
        if self.args.steps is not None:
            if self.st.steps[stage] >= self.args.steps:
                return True
        if deadline is not None and time.time() >= deadline:
            return True
        return False

    def run_loop(self, stage, deadline, opt, params, step_fn, lr, warmup=50):
        """Generic loop: step_fn() -> (loss tensor, dict of floats)."""
        acc, acc_n, n_acc = {}, {}, 0
        t0 = time.time()
        t_stage = time.time()
        while not self.finished(stage, deadline):
            step = self.st.steps[stage]
            f = lr_factor(step, warmup, time.time(), deadline, self.args.cooldown * 60)
            for gr in opt.param_groups:
                gr["lr"] = lr * f
            loss, parts = step_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if stage == "dit":
                self.update_ema(step)
            self.st.steps[stage] = step + 1
            for k, v in parts.items():
                acc[k] = acc.get(k, 0.0) + v
                acc_n[k] = acc_n.get(k, 0) + 1
            n_acc += 1
            if (step + 1) % self.args.log_every == 0 or self.args.steps is not None:
                # Per key: steps may report different quantities (decoder-only alternates).
                mean = {k: v / acc_n[k] for k, v in acc.items()}
                dt = (time.time() - t0) / n_acc
                self.st.losses[stage].append(
                    {"step": step + 1, "t": round(self.st.elapsed[stage] + time.time() - t_stage, 2),
                     **{k: round(v, 6) for k, v in mean.items()}})
                self.log(f"{stage} step {step + 1}: "
                         + " ".join(f"{k} {v:.4f}" for k, v in mean.items())
                         + f" ({dt * 1000:.0f} ms/step)")
                acc, acc_n, n_acc, t0 = {}, {}, 0, time.time()
            if self.args.steps is None:
                self.st.elapsed[stage] += time.time() - t_stage
                t_stage = time.time()
                self.checkpoint(opt)
                self.export()
        self.st.elapsed[stage] += time.time() - t_stage
        self.st.done[stage] = True
        self.checkpoint(opt, force=True)
        self.export(force=True)
        self.write_losses()

    # -- stage 1: VAE ----------------------------------------------------------------------
    def stage_vae(self, deadline):
        vae = self.st.vae.train()
        dec_only = self.args.vae_decoder_only
        if dec_only:
            vae.encoder.eval().requires_grad_(False)
        params = list((vae.decoder if dec_only else vae).parameters())
        opt = self.make_opt("vae-decoder" if dec_only else "vae", params, self.args.lr_vae)
        photos = self.get_photos()
        g = self.st.gen
        target_std = 1.0 / VAE_SCALE

        rob = self.st.robust.eval().requires_grad_(False) if self.st.robust_init else None
        w_worst = self.args.worst_pixels

        def with_worst(loss, parts, rec, target):
            if not w_worst:
                return loss, parts
            w = worst_pixels(rec, target)
            total = loss + w_worst * w
            return total, {**parts, "loss": total.item(), "worst": w.item()}

        def robust_step():
            # Decode what restoration decodes: the robust encoder's latent of the upscaled
            # LQ image, against its HQ crop.
            hq, lq, _ = self.lq_batch(self.bs_vae)
            hq = self.nhwc(hq)
            with torch.no_grad(), self._amp():
                z = rob(self.nhwc(D.upscale(lq, self.args.scale)))[0].float()
            with self._amp():
                rec = vae.decoder(z).float()
            l1 = (rec - hq).abs().mean()
            l2 = ((rec - hq) ** 2).mean()
            loss = l1 + l2
            psnr = -10 * math.log10(max(l2.item() / 4, 1e-10))
            return with_worst(loss, {"loss": loss.item(), "l1": l1.item(), "psnr_lq": psnr},
                              rec, hq)

        def step_fn():
            if dec_only and rob is not None and self.st.steps["vae"] % 2 == 1:
                return robust_step()
            x = self.nhwc(photos.batch(self.st.data_gen, self.bs_vae, self.crop))
            with self._amp():
                mean, logvar = vae.encoder(x)
                mean, logvar = mean.float(), logvar.float().clamp(-30, 20)
                eps = torch.randn(mean.shape, generator=g, device=g.device)
                z = mean + torch.exp(0.5 * logvar) * eps
                rec = vae.decoder(z).float()
            l1 = (rec - x).abs().mean()
            l2 = ((rec - x) ** 2).mean()
            if dec_only:
                # The frozen encoder's latent statistics are what they are: pixels only.
                loss = l1 + l2
                psnr = -10 * math.log10(max(l2.item() / 4, 1e-10))
                return with_worst(loss, {"loss": loss.item(), "l1": l1.item(), "psnr": psnr},
                                  rec, x)
            kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
            # Keep the latent statistics at SD3's (shift 0.0609, scale 1.5305), so the
            # standard latent normalisation gives the diffusion model unit-variance input.
            m_c = mean.mean(dim=(0, 2, 3))
            s_c = mean.std(dim=(0, 2, 3))
            mom = ((m_c - VAE_SHIFT) ** 2).mean() + ((s_c - target_std) ** 2).mean()
            loss = l1 + l2 + 1e-6 * kl + 0.1 * mom
            psnr = -10 * math.log10(max(l2.item() / 4, 1e-10))
            return with_worst(loss, {"loss": loss.item(), "l1": l1.item(), "psnr": psnr,
                                     "mom": mom.item()}, rec, x)

        self.run_loop("vae", deadline, opt, params, step_fn, self.args.lr_vae)
        vae.eval().requires_grad_(True)
        if rob is not None:
            rob.requires_grad_(True)

    # -- stage 2: robust encoder -----------------------------------------------------------
    def stage_robust(self, deadline):
        vae = self.st.vae.eval().requires_grad_(False)
        rob = self.st.robust
        if not self.st.robust_init:
            rob.load_state_dict(vae.encoder.state_dict())
            self.st.robust_init = True
        rob.train().requires_grad_(True)
        params = list(rob.parameters())
        opt = self.make_opt("robust", params, self.args.lr_robust)

        def step_fn():
            hq, lq, _ = self.lq_batch(self.bs_vae)
            hq = self.nhwc(hq)
            with torch.no_grad(), self._amp():
                z_hq = to_scaled(vae.encoder(hq)[0].float())
            with self._amp():
                mean = rob(self.nhwc(D.upscale(lq, self.args.scale)))[0].float()
                rec = vae.decoder(mean).float()
            lat = ((to_scaled(mean) - z_hq) ** 2).mean()
            pix = (rec - hq).abs().mean()
            loss = lat + pix
            return loss, {"loss": loss.item(), "latent": lat.item(), "pix_l1": pix.item()}

        self.run_loop("robust", deadline, opt, params, step_fn, self.args.lr_robust)
        rob.eval()
        vae.requires_grad_(True)

    # -- stage 3: MMDiT + LQ branch + CLIP + adapters ----------------------------------------
    def stage_dit(self, deadline):
        if not self.st.robust_init:
            self.st.robust.load_state_dict(self.st.vae.encoder.state_dict())
            self.st.robust_init = True
        enc = self.st.vae.encoder.eval().requires_grad_(False)
        rob = self.st.robust.eval().requires_grad_(False)
        model = self.st.model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = self.make_opt("dit", params, self.args.lr_dit)
        g = self.st.gen
        s = self.args.scale
        velocity = model.velocity
        if self.args.compile and self.cuda:
            velocity = torch.compile(model.velocity)

        def step_fn():
            hq, lq, lq_glob = self.lq_batch(self.bs_dit)
            b = hq.shape[0]
            hq = self.nhwc(hq)
            lq_up = self.nhwc(D.upscale(lq, s))
            with torch.no_grad(), self._amp():
                z0 = to_scaled(enc(hq)[0].float())
                z_lq = to_scaled(rob(lq_up)[0].float())
            # SD3: logit-normal timesteps, z_t = (1 - sigma) z0 + sigma eps, target eps - z0.
            sigma = torch.sigmoid(torch.randn(b, generator=g, device=g.device))
            eps = torch.randn(z0.shape, generator=g, device=g.device)
            sg = sigma[:, None, None, None]
            z_t = (1 - sg) * z0 + sg * eps
            drop = (torch.rand(b, generator=g, device=g.device) < 0.1).float()
            with self._amp():
                ctx, y = model.prompts(lq_up, D.upscale(lq_glob, s))
                keep = (1 - drop)
                ctx = ctx * keep[:, None, None].to(ctx.dtype)
                y = y * keep[:, None].to(y.dtype)
                v = velocity(z_t, 1000 * sigma, z_lq, ctx, y).float()
            loss = ((v - (eps - z0)) ** 2).mean()
            return loss, {"loss": loss.item()}

        self.run_loop("dit", deadline, opt, params, step_fn, self.args.lr_dit, warmup=100)
        model.eval()

    @torch.no_grad()
    def update_ema(self, step):
        decay = min(0.999, (1 + step) / (10 + step))
        for pe, pm in zip(self.st.ema.parameters(), self.st.model.parameters()):
            pe.lerp_(pm.detach(), 1 - decay)

    def nhwc(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.cl else x

    def _amp(self):
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    # -- driver ----------------------------------------------------------------------------
    def run(self):
        a = self.args
        stages = list(STAGES) if a.stage == "all" else [a.stage]
        cfg = self.cfg
        self.log(f"device {self.device}; config {json.dumps(cfg.to_dict())}")
        self.log("params: vae enc {} dec {}, mmdit {}, clip {}, dpir parts {}, robust enc {}".format(
            param_count(self.st.vae.encoder), param_count(self.st.vae.decoder),
            param_count(self.st.model.mmdit), param_count(self.st.model.clip),
            param_count(self.st.model.dpir), param_count(self.st.robust)))
        self.export(force=True)
        if a.steps is None:
            todo = [s for s in stages if not self.st.done[s]]
            if not todo:
                # A checkpoint whose stages are all done: train them further.
                self.log("all selected stages were done in the checkpoint; training further")
                todo = stages
        else:
            todo = [s for s in stages if self.st.steps[s] < a.steps]
        split = dict(DEFAULT_SPLIT)
        if a.split:
            vals = [float(v) for v in a.split.split(",")]
            if len(vals) != 3:
                raise SystemExit("error: --split needs three numbers (vae,robust,dit)")
            split = dict(zip(STAGES, vals))
        start = time.time()
        total = a.minutes * 60 if a.minutes is not None else None
        if a.until is not None:
            total = a.until - start
        if total is not None and a.val:
            total -= 10  # the final evaluation
        for i, stage in enumerate(todo):
            if self.stop:
                self.log(f"stage {stage}: skipped (stop requested)")
                continue
            deadline = None
            if total is not None:
                left = total - (time.time() - start)
                share = split[stage] / max(sum(split[s] for s in todo[i:]), 1e-9)
                deadline = time.time() + max(left * share, 0.0)
                self.log(f"stage {stage}: {left * share:.0f} s of {left:.0f} s left")
            else:
                self.log(f"stage {stage}: up to step {a.steps}")
            getattr(self, f"stage_{stage}")(deadline)
        if self.pairs is not None:
            self.pairs.stop()
        self.export(force=True)
        if a.val and not self.stop:
            self.run_eval()
        self.write_losses()
        self.log(f"finished: steps {self.st.steps}")

    def run_eval(self):
        from .evaluate import evaluate
        try:
            t = time.time()
            photos = D.PhotoCrops(self.args.val, self.device, self.crop)
            for m in (self.st.vae, self.st.robust, self.st.model, self.st.ema):
                m.eval()
            res = evaluate(self.st, photos, self.device, self._amp, crop=self.crop,
                           n=16 if self.cuda else 2, should_stop=lambda: self.stop)
            self.st.losses.setdefault("eval", []).append(
                {"steps": dict(self.st.steps), **res})
            self.log(f"eval (PSNR dB, held-out {self.crop} px crops, stand-in x4 degradation, "
                     f"{time.time() - t:.1f} s): {json.dumps(res)}")
        except Exception as e:  # the evaluation is informative only
            self.log(f"eval skipped: {e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.minutes is None and args.steps is None and args.until is None:
        print("error: give --minutes, --until or --steps", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "train.log"), echo=not args.quiet)
    runner = Runner(args, log)

    def on_signal(signum, _frame):
        # Finish the current step, checkpoint, export, then exit.
        log(f"signal {signum}: stopping after this step")
        runner.stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
