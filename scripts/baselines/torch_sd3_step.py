#!/usr/bin/env python3
"""PyTorch + diffusers baseline for one MMDiT sampling step, same shapes as `dpir bench`.

SD3Transformer2DModel (SD3-medium config, or SD3.5-medium with --config sd35-medium-1024),
random bf16 weights, 1024x1024 (128x128 latent), CFG as batch 2, 154 context tokens, SDPA
attention. Also times F.scaled_dot_product_attention alone at the joint-attention shape.

usage: torch_sd3_step.py [--config sd3-medium-1024|sd35-medium-1024] [--reps N] [--json FILE]
Prints `skipped: ...` and exits 0 when torch/diffusers/CUDA are unavailable.
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="sd3-medium-1024")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        print(f"skipped: torch not importable ({e})")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA device for torch")
        return 0
    try:
        from diffusers import SD3Transformer2DModel
    except Exception as e:  # noqa: BLE001
        print(f"skipped: diffusers not importable ({e})")
        return 0

    cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
               num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    if a.config == "sd35-medium-1024":
        cfg.update(pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
    elif a.config != "sd3-medium-1024":
        print(f"skipped: config {a.config} has no PyTorch baseline")
        return 0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()
    with dev:
        model = SD3Transformer2DModel(**cfg).to(torch.bfloat16).eval()
    print(f"model built in {time.time() - t0:.1f} s, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params (random weights)")
    b, lat, ctx = 2, 128, 154
    x = torch.randn(b, 16, lat, lat, device=dev, dtype=torch.bfloat16)
    enc = torch.randn(b, ctx, 4096, device=dev, dtype=torch.bfloat16)
    pooled = torch.randn(b, 2048, device=dev, dtype=torch.bfloat16)
    t = torch.full((b,), 500.0, device=dev)

    def step(m):
        with torch.no_grad():
            v = m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                  return_dict=False)[0]
            vc, vu = v.chunk(2)
            return x[:1] + (-0.01) * (vu + 4.5 * (vc - vu))

    def timeit(fn, reps):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps

    torch.cuda.reset_peak_memory_stats()
    eager_ms = timeit(lambda: step(model), a.reps)
    peak = torch.cuda.max_memory_allocated()
    out = {"device": torch.cuda.get_device_name(0), "config": a.config, "torch": torch.__version__,
           "weights": "random", "eager_step_ms": eager_ms, "peak_bytes": peak}
    print(f"PyTorch eager step ({a.config}, batch 2, SDPA): {eager_ms:.2f} ms, peak {peak / 1e9:.2f} GB")

    L = (lat // 2) ** 2 + ctx
    q = torch.randn(b, 24, L, 64, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    sdpa_ms = timeit(lambda: F.scaled_dot_product_attention(q, k, v), a.reps)
    flops = 4 * b * 24 * L * L * 64
    out["sdpa_ms"] = sdpa_ms
    out["sdpa_tflops"] = flops / sdpa_ms / 1e9
    print(f"SDPA joint attention B={b} H=24 L={L} hd=64: {sdpa_ms:.3f} ms, {flops / sdpa_ms / 1e9:.0f} TFLOP/s")
    if a.compile:
        try:
            cm = torch.compile(model)
            out["compiled_step_ms"] = timeit(lambda: step(cm), a.reps)
            print(f"PyTorch torch.compile step: {out['compiled_step_ms']:.2f} ms")
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile failed: {e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
