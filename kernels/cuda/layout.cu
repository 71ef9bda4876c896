// layout.cu: patchify / unpatchify, positional-embedding crop-add, CFG + Euler update, and the
// head split/merge used by the unfused (GEMM + softmax) attention fallback.
//
// Kernels (`extern "C"`, bf16 carried as u16):
//   patchify_f32_bf16(x, out, B, C, H, W, p)
//       x [B, C, H, W] f32 latent -> out [B * (H/p) * (W/p), C * p * p] bf16, column order
//       (c, ky, kx) = the flattened `x_embedder.proj` conv weight, so a GEMM finishes the conv.
//   pos_embed_add_bf16(x, pos, B, hp, wp, D, M)
//       x [B, hp * wp, D] += pos [M * M, D] cropped at the centre (top = (M - hp) / 2,
//       left = (M - wp) / 2), as SD3's `cropped_pos_embed`.
//   unpatchify_bf16_f32(x, out, B, C, H, W, p)
//       x [B * (H/p) * (W/p), p * p * C] (column order (ky, kx, c), SD3's `unpatchify`)
//       -> out [B, C, H, W] f32.
//   cfg_euler_f32(z, v, n, cfg, dsigma)
//       v holds 2 halves of n values: [cond ; uncond]. z[i] += dsigma * (vu + cfg (vc - vu)),
//       rounded as fma(dsigma, fma(cfg, vc - vu, vu), z) (explicit, so that every variant
//       below gives the same bits).
//   cfg_euler_dsig_f32(z, v, n, cfg, dsigma_ptr)
//       the same with dsigma read from device memory (*dsigma_ptr): the CUDA-graph step.
//   schedule_step_f32(timesteps, dsigmas, counter, t_cur, dsigma_cur, B, steps)
//       the device-resident sampling schedule: idx = min(*counter, steps - 1);
//       t_cur[0..B) = timesteps[idx*B ..), *dsigma_cur = dsigmas[idx], then *counter = idx + 1.
//       One block (any blockDim, B any size); launch exactly one block, first in the step.
//   cfg_combine_f32(v, out, n, cfg)   out[i] = vu + cfg (vc - vu) (same layout).
//   split_heads_bf16(qkv_a, qkv_b, q, k, v, B, La, Lb, H, hd)
//       fused qkv [B, L*, 3 H hd] of the context (a) and image (b) streams -> q, k, v
//       [B, H, La + Lb, hd], context tokens first.
//   merge_heads_bf16(o, out_a, out_b, B, La, Lb, H, hd)
//       o [B, H, La + Lb, hd] -> out_a [B, La, H hd], out_b [B, Lb, H hd].
// Launch shapes: one output element per thread, block 256, grid ceil(elements / 256).
// Versions: v1. Check: engine/tests/cuda_kernels.rs.
#include "common.cuh"

extern "C" __global__ void patchify_f32_bf16(const float* __restrict__ x, bf16_t* __restrict__ out,
                                             int B, int C, int H, int W, int p) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int hp = H / p, wp = W / p, K = C * p * p;
    size_t total = (size_t)B * hp * wp * K;
    if (i >= total) return;
    int col = (int)(i % K);
    size_t tok = i / K;
    int wx = (int)(tok % wp);
    int hy = (int)((tok / wp) % hp);
    int b = (int)(tok / ((size_t)wp * hp));
    int kx = col % p, ky = (col / p) % p, c = col / (p * p);
    out[i] = f2bf(x[(((size_t)b * C + c) * H + hy * p + ky) * W + wx * p + kx]);
}

extern "C" __global__ void pos_embed_add_bf16(bf16_t* __restrict__ x, const bf16_t* __restrict__ pos,
                                              int B, int hp, int wp, int D, int M) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t total = (size_t)B * hp * wp * D;
    if (i >= total) return;
    int d = (int)(i % D);
    int tok = (int)((i / D) % ((size_t)hp * wp));
    int top = (M - hp) / 2, left = (M - wp) / 2;
    int r = tok / wp, c = tok % wp;
    float pv = bf2f(pos[((size_t)(top + r) * M + left + c) * D + d]);
    x[i] = f2bf(bf2f(x[i]) + pv);
}

extern "C" __global__ void unpatchify_bf16_f32(const bf16_t* __restrict__ x, float* __restrict__ out,
                                               int B, int C, int H, int W, int p) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t total = (size_t)B * C * H * W;
    if (i >= total) return;
    int xx = (int)(i % W);
    int yy = (int)((i / W) % H);
    int c = (int)((i / ((size_t)W * H)) % C);
    int b = (int)(i / ((size_t)W * H * C));
    int hp = H / p, wp = W / p;
    int tok = (yy / p) * wp + xx / p;
    int col = ((yy % p) * p + (xx % p)) * C + c;
    out[i] = bf2f(x[((size_t)b * hp * wp + tok) * ((size_t)p * p * C) + col]);
}

__device__ __forceinline__ float cfg_euler_update(float z, float vc, float vu, float cfg,
                                                  float dsigma) {
    return __fmaf_rn(dsigma, __fmaf_rn(cfg, __fsub_rn(vc, vu), vu), z);
}

extern "C" __global__ void cfg_euler_f32(float* __restrict__ z, const float* __restrict__ v, size_t n,
                                         float cfg, float dsigma) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    z[i] = cfg_euler_update(z[i], v[i], v[n + i], cfg, dsigma);
}

extern "C" __global__ void cfg_euler_dsig_f32(float* __restrict__ z, const float* __restrict__ v,
                                              size_t n, float cfg,
                                              const float* __restrict__ dsigma) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    z[i] = cfg_euler_update(z[i], v[i], v[n + i], cfg, *dsigma);
}

extern "C" __global__ void schedule_step_f32(const float* __restrict__ timesteps,
                                             const float* __restrict__ dsigmas, int* counter,
                                             float* __restrict__ t_cur,
                                             float* __restrict__ dsigma_cur, int B, int steps) {
    if (blockIdx.x != 0 || steps <= 0) return;
    int idx = *counter;
    idx = idx < 0 ? 0 : (idx >= steps ? steps - 1 : idx);
    for (int i = threadIdx.x; i < B; i += blockDim.x) t_cur[i] = timesteps[(size_t)idx * B + i];
    if (threadIdx.x == 0) *dsigma_cur = dsigmas[idx];
    __syncthreads();  // every thread has read *counter before it moves on
    if (threadIdx.x == 0) *counter = idx + 1;
}

extern "C" __global__ void cfg_combine_f32(const float* __restrict__ v, float* __restrict__ out, size_t n,
                                           float cfg) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float vc = v[i], vu = v[n + i];
    out[i] = vu + cfg * (vc - vu);
}

extern "C" __global__ void split_heads_bf16(const bf16_t* __restrict__ qkv_a, const bf16_t* __restrict__ qkv_b,
                                            bf16_t* __restrict__ q, bf16_t* __restrict__ k,
                                            bf16_t* __restrict__ v, int B, int La, int Lb, int H, int hd) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int L = La + Lb;
    size_t total = (size_t)B * H * L * hd;
    if (i >= total) return;
    int e = (int)(i % hd);
    int l = (int)((i / hd) % L);
    int h = (int)((i / ((size_t)hd * L)) % H);
    int b = (int)(i / ((size_t)hd * L * H));
    size_t width = (size_t)3 * H * hd;
    const bf16_t* src = l < La ? qkv_a + ((size_t)b * La + l) * width
                               : qkv_b + ((size_t)b * Lb + (l - La)) * width;
    size_t o = (size_t)h * hd + e;
    q[i] = src[o];
    k[i] = src[(size_t)H * hd + o];
    v[i] = src[(size_t)2 * H * hd + o];
}

extern "C" __global__ void merge_heads_bf16(const bf16_t* __restrict__ o, bf16_t* __restrict__ out_a,
                                            bf16_t* __restrict__ out_b, int B, int La, int Lb, int H,
                                            int hd) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int L = La + Lb;
    size_t total = (size_t)B * L * H * hd;
    if (i >= total) return;
    // i indexes the output layout [B, L, H, hd].
    int e = (int)(i % hd);
    int h = (int)((i / hd) % H);
    int l = (int)((i / ((size_t)hd * H)) % L);
    int b = (int)(i / ((size_t)hd * H * L));
    bf16_t val = o[(((size_t)b * H + h) * L + l) * hd + e];
    size_t col = (size_t)h * hd + e;
    if (l < La)
        out_a[((size_t)b * La + l) * H * hd + col] = val;
    else
        out_b[((size_t)b * Lb + (l - La)) * H * hd + col] = val;
}
