"""Training data: HQ crops from photos, LQ/HQ pairs written by `dpir degrade`, and a
simple on-device degradation used when no pairs exist (yet).

Images are kept as uint8 tensors [3, H, W]; batches come out as float in [-1, 1].
All randomness goes through one `torch.Generator` so that runs resume exactly.
"""

from __future__ import annotations

import math
import os
import threading
import time

import torch
import torch.nn.functional as F

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image(path: str) -> torch.Tensor:
    """RGB uint8 [3, H, W]; Pillow first, torchvision as the fallback."""
    try:
        from PIL import Image
        import numpy as np
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    except ImportError:
        from torchvision.io import decode_image, ImageReadMode
        return decode_image(path, mode=ImageReadMode.RGB)


def write_png(path: str, img: torch.Tensor) -> None:
    """img uint8 [3, H, W]."""
    from PIL import Image
    Image.fromarray(img.permute(1, 2, 0).contiguous().cpu().numpy()).save(path)


def list_images(folder: str) -> list:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTS))


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def randint(g: torch.Generator, hi: int) -> int:
    """Uniform integer in [0, hi) from the generator (CPU or device)."""
    if hi <= 1:
        return 0
    return int(torch.randint(hi, (1,), generator=g, device=g.device).item())


class PhotoCrops:
    """Random square crops (with random flips) of a set of photos."""

    def __init__(self, folder: str, device: torch.device, min_side: int):
        paths = list_images(folder)
        self.images = []
        for p in paths:
            try:
                img = read_image(p)
            except Exception as e:  # a broken file is skipped, not fatal
                print(f"data: skipping {p}: {e}", flush=True)
                continue
            if min(img.shape[1:]) >= min_side:
                self.images.append(img.to(device))
        if not self.images:
            raise SystemExit(f"error: no usable images (>= {min_side} px) in {folder}")
        self.device = device

    def batch(self, g: torch.Generator, n: int, size: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            img = self.images[randint(g, len(self.images))]
            _, h, w = img.shape
            y, x = randint(g, h - size + 1), randint(g, w - size + 1)
            c = img[:, y:y + size, x:x + size]
            if randint(g, 2):
                c = c.flip(2)
            out.append(c)
        return to_float(torch.stack(out).to(self.device))


class PairStore:
    """LQ/HQ pairs from `DIR/hq/*.png` + `DIR/lq/*.png` (several DIRs: comma-separated),
    growing while `dpir degrade` writes them.

    `refresh()` merges what a background thread has read since the last call; the set only
    changes there, so a run whose folder is complete at start is deterministic.
    """

    def __init__(self, folder: str, scale: int = 4, max_pairs: int = 12000,
                 initial: int | None = None):
        self.folder = folder
        self.max_pairs = max_pairs
        self.scale = scale
        self.hq: list = []
        self.lq: list = []
        self._seen: set = set()
        self._pending: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        # Only a first handful synchronously: decoding thousands of PNGs here would stall
        # training for minutes; `start_background` reads the rest while training runs.
        self._load_new(limit=initial, into_pending=False)

    def _candidates(self):
        for folder in self.folder.split(","):
            hq_dir, lq_dir = os.path.join(folder, "hq"), os.path.join(folder, "lq")
            lq_names = set(os.listdir(lq_dir)) if os.path.isdir(lq_dir) else set()
            for p in list_images(hq_dir):
                name = os.path.basename(p)
                if name in lq_names and p not in self._seen:
                    yield p, p, os.path.join(lq_dir, name)

    def _load_new(self, limit, into_pending: bool) -> int:
        n = 0
        for name, hp, lp in self._candidates():
            if len(self._seen) >= self.max_pairs:
                break
            # A file still being written fails to decode; it is retried next time.
            try:
                hq, lq = read_image(hp), read_image(lp)
            except Exception:
                continue
            if hq.shape[1] != lq.shape[1] * self.scale or hq.shape[2] != lq.shape[2] * self.scale:
                self._seen.add(name)
                continue
            self._seen.add(name)
            if into_pending:
                with self._lock:
                    self._pending.append((hq, lq))
            else:
                self.hq.append(hq)
                self.lq.append(lq)
            n += 1
            if limit is not None and n >= limit:
                break
        return n

    def start_background(self, interval: float = 5.0) -> None:
        if self._thread is not None:
            return

        def loop():
            while not self._stop.is_set():
                try:
                    self._load_new(limit=512, into_pending=True)
                except Exception as e:
                    print(f"data: pair loader: {e}", flush=True)
                self._stop.wait(interval)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> int:
        with self._lock:
            new, self._pending = self._pending, []
        for hq, lq in new:
            self.hq.append(hq)
            self.lq.append(lq)
        return len(new)

    def __len__(self) -> int:
        return len(self.hq)

    def batch(self, g: torch.Generator, n: int, local: int, device: torch.device):
        """Returns (hq_local [n,3,local,local], lq_local [n,3,local/s,local/s],
        lq_global [n,3,S/s,S/s]) in [-1,1]: a random `local` crop of each pair (aligned to
        the scale and to 8 px), and the LQ of the whole pair region as its global view."""
        s = self.scale
        hq_l, lq_l, lq_g = [], [], []
        step = math.lcm(8, s)
        for _ in range(n):
            i = randint(g, len(self.hq))
            hq, lq = self.hq[i], self.lq[i]
            _, h, w = hq.shape
            y = randint(g, (h - local) // step + 1) * step
            x = randint(g, (w - local) // step + 1) * step
            a = hq[:, y:y + local, x:x + local]
            b = lq[:, y // s:(y + local) // s, x // s:(x + local) // s]
            gl = lq
            if randint(g, 2):
                a, b, gl = a.flip(2), b.flip(2), gl.flip(2)
            hq_l.append(a)
            lq_l.append(b)
            lq_g.append(gl)
        # Pairs can differ in size; global views are resized to the first one's size.
        gsize = lq_g[0].shape[1:]
        lq_g = [t if t.shape[1:] == gsize else
                F.interpolate(t[None].float(), size=tuple(gsize), mode="area")[0].round().to(torch.uint8)
                for t in lq_g]
        return (to_float(torch.stack(hq_l).to(device)), to_float(torch.stack(lq_l).to(device)),
                to_float(torch.stack(lq_g).to(device)))


def _gauss_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    r = torch.arange(size, device=sigma.device, dtype=torch.float32) - size // 2
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    return k / k.sum(1, keepdim=True)


def synthetic_lq(hq: torch.Tensor, g: torch.Generator, scale: int = 4) -> torch.Tensor:
    """A light stand-in degradation on the device: Gaussian blur (sigma 0.2-2), antialiased
    bicubic downscale, Gaussian noise (sigma 0-12/255, prob 0.7), 8-bit rounding.
    hq in [-1,1] [B,3,H,W] -> lq in [-1,1] [B,3,H/s,W/s]."""
    b = hq.shape[0]
    dev = hq.device
    sigma = 0.2 + 1.8 * torch.rand(b, generator=g, device=g.device).to(dev)
    k = _gauss_kernels(sigma, 13)  # [B, 13]
    x = (hq.float() + 1) * 0.5
    x = F.pad(x, (6, 6, 6, 6), mode="reflect")
    # Per-sample separable blur as a grouped conv over (sample, channel).
    xs = x.reshape(1, b * 3, x.shape[2], x.shape[3])
    kh = k.repeat_interleave(3, 0)[:, None, None, :]
    kv = k.repeat_interleave(3, 0)[:, None, :, None]
    xs = F.conv2d(F.conv2d(xs, kh, groups=b * 3), kv, groups=b * 3)
    x = xs.reshape(b, 3, hq.shape[2], hq.shape[3])
    x = F.interpolate(x, scale_factor=1.0 / scale, mode="bicubic", antialias=True,
                      align_corners=False)
    ns = 12.0 / 255 * torch.rand(b, generator=g, device=g.device).to(dev)
    on = (torch.rand(b, generator=g, device=g.device) < 0.7).float().to(dev)
    noise = torch.randn(x.shape, generator=g, device=g.device).to(dev)
    x = x + noise * (ns * on)[:, None, None, None]
    x = (x.clamp(0, 1) * 255).round() / 255
    return x * 2 - 1


def upscale(lq: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Bicubic upscaling as the pipeline does it before the robust encoder and CLIP
    (PIL's bicubic, which `antialias=True` reproduces), clamped to [-1, 1]."""
    return F.interpolate(lq, scale_factor=float(scale), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1, 1)


def wait_for_pairs(store: PairStore, n: int, seconds: float) -> None:
    end = time.time() + seconds
    while len(store) + len(store._pending) < n and time.time() < end:
        time.sleep(1.0)
    store.refresh()
