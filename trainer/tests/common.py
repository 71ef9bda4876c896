"""Helpers for the trainer tests: tiny synthetic photo sets and pair folders."""

import math
import os

import torch

from trainer import data as D


def smooth_image(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A random smooth RGB image (low-frequency waves + a little texture), uint8 [3,H,W]."""
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    img = torch.zeros(3, h, w)
    for c in range(3):
        for _ in range(3):
            fx, fy, ph = (torch.rand(3, generator=g) * torch.tensor([6.0, 6.0, 2 * math.pi]))
            img[c] += torch.sin(fx * 2 * math.pi * xx + fy * 2 * math.pi * yy + ph)
    img = img / 3 * 0.45 + 0.5 + 0.03 * torch.randn(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def make_photos(folder: str, n: int = 4, size=(80, 96), seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        D.write_png(os.path.join(folder, f"p{i}.png"), smooth_image(g, *size))
    return folder


def make_pairs(folder: str, n: int = 3, size: int = 64, scale: int = 4, seed: int = 1) -> str:
    """HQ images and their area-downscaled LQ, as `dpir degrade` lays them out."""
    g = torch.Generator().manual_seed(seed)
    for sub in ("hq", "lq"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(n):
        hq = smooth_image(g, size, size)
        lq = torch.nn.functional.avg_pool2d(hq[None].float(), scale)[0].round().to(torch.uint8)
        D.write_png(os.path.join(folder, "hq", f"{i:06d}.png"), hq)
        D.write_png(os.path.join(folder, "lq", f"{i:06d}.png"), lq)
    return folder
