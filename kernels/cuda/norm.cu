// norm.cu: the normalisations of the MMDiT, CLIP and the LQ alignment (bf16 storage, f32 math).
//
// Kernels (all `extern "C"`, bf16 carried as u16, see common.cuh):
//   adaln_modulate_bf16   out = LayerNorm(x; no affine, eps) * (1 + scale[s]) + shift[s]
//                         one warp per row, rows of D (D % 8 == 0), s = row / tokens;
//                         shift/scale are read from the adaLN GEMM output `mod`
//                         ([samples, mod_stride] bf16) at column offsets shift_off/scale_off.
//                         launch: block 256 (8 rows), grid ceil(rows / 8).
//   gated_residual_bf16   x += gate[s] * y, s = row / tokens, 8 elements per thread.
//                         launch: block 256, grid ceil(rows * D / 8 / 256).
//   rmsnorm_qk_bf16       in place on a fused qkv buffer [rows, 3 * H * hd]: q and k of each
//                         head scaled by rsqrt(mean(v^2) + eps) * w (w f32 [hd]); v untouched.
//                         one warp per (row, head, q|k), hd % 32 == 0, hd <= 256.
//                         launch: block 256, grid ceil(rows * H * 2 / 8).
//   channel_stats_bf16    per (sample, channel) mean and biased std over N tokens of
//                         x [B, N, D] (two passes, f32). launch: block (32, 8), grid (ceil(D/32), B).
//   align_add_bf16        LQ adaptive feature alignment (docs/ARCHITECTURE.md):
//                         x += gate[d] * ((f - mf) / (sf + eps) * sx + mx), per sample/channel.
//                         launch: block 256, grid ceil(B * N * D / 256).
//   layernorm_affine_bf16 CLIP LayerNorm with f32 gamma/beta; one warp per row (D % 8 == 0).
//                         launch: block 256, grid ceil(rows / 8).
// Versions: v1 (warp-per-row, three reads of the row, which stays in L1).
// Check: engine/tests/cuda_kernels.rs (vs the CPU f32 reference, every shape, outputs poisoned).
#include "common.cuh"

extern "C" __global__ void adaln_modulate_bf16(const bf16_t* __restrict__ x, bf16_t* __restrict__ out,
                                               const bf16_t* __restrict__ mod, int rows, int tokens,
                                               int D, int mod_stride, int shift_off, int scale_off,
                                               float eps) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16_t* xr = x + (size_t)row * D;
    bf16_t* outr = out + (size_t)row * D;
    const bf16_t* m = mod + (size_t)(row / tokens) * mod_stride;
    const bf16_t* shift = m + shift_off;
    const bf16_t* scale = m + scale_off;
    float v[8];
    float s = 0.f;
    for (int c = lane * 8; c < D; c += 256) {
        load8(xr + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) s += v[i];
    }
    float mean = warp_sum(s) / (float)D;
    float q = 0.f;
    for (int c = lane * 8; c < D; c += 256) {
        load8(xr + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float d = v[i] - mean;
            q += d * d;
        }
    }
    float rstd = rsqrtf(warp_sum(q) / (float)D + eps);
    for (int c = lane * 8; c < D; c += 256) {
        float sh[8], sc[8];
        load8(xr + c, v);
        // shift/scale offsets are multiples of D, and D % 8 == 0, so 16-byte aligned
        // whenever mod_stride % 8 == 0 (checked by the launcher).
        load8(shift + c, sh);
        load8(scale + c, sc);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = (v[i] - mean) * rstd * (1.f + sc[i]) + sh[i];
        store8(outr + c, v);
    }
}

extern "C" __global__ void gated_residual_bf16(bf16_t* __restrict__ x, const bf16_t* __restrict__ y,
                                               const bf16_t* __restrict__ mod, int rows, int tokens,
                                               int D, int mod_stride, int gate_off) {
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    size_t total = (size_t)rows * D;
    if (i >= total) return;
    int row = (int)(i / D);
    int c = (int)(i - (size_t)row * D);
    const bf16_t* g = mod + (size_t)(row / tokens) * mod_stride + gate_off + c;
    float xv[8], yv[8], gv[8];
    load8(x + i, xv);
    load8(y + i, yv);
    load8(g, gv);
#pragma unroll
    for (int k = 0; k < 8; ++k) xv[k] += gv[k] * yv[k];
    store8(x + i, xv);
}

extern "C" __global__ void rmsnorm_qk_bf16(bf16_t* __restrict__ qkv, const float* __restrict__ wq,
                                           const float* __restrict__ wk, int rows, int H, int hd,
                                           float eps) {
    int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (gw >= rows * H * 2) return;
    int which = gw & 1;  // 0: q, 1: k
    int head = (gw >> 1) % H;
    int row = (gw >> 1) / H;
    bf16_t* p = qkv + (size_t)row * 3 * H * hd + (size_t)which * H * hd + (size_t)head * hd;
    const float* w = which ? wk : wq;
    float v[8];
    int per = hd / 32;  // 1..8 elements per lane
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        if (k < per) {
            v[k] = bf2f(p[lane * per + k]);
            s += v[k] * v[k];
        }
    }
    float r = rsqrtf(warp_sum(s) / (float)hd + eps);
#pragma unroll
    for (int k = 0; k < 8; ++k)
        if (k < per) p[lane * per + k] = f2bf(v[k] * r * w[lane * per + k]);
}

extern "C" __global__ void channel_stats_bf16(const bf16_t* __restrict__ x, float* __restrict__ mean,
                                              float* __restrict__ stdv, int B, int N, int D) {
    __shared__ float red[8][33];
    int d = blockIdx.x * 32 + threadIdx.x;
    int b = blockIdx.y;
    bool ok = d < D;
    const bf16_t* xb = x + (size_t)b * N * D;
    float s = 0.f;
    if (ok)
        for (int n = threadIdx.y; n < N; n += 8) s += bf2f(xb[(size_t)n * D + d]);
    red[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    float tot = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) tot += red[k][threadIdx.x];
    float mu = tot / (float)N;
    __syncthreads();
    float q = 0.f;
    if (ok)
        for (int n = threadIdx.y; n < N; n += 8) {
            float dv = bf2f(xb[(size_t)n * D + d]) - mu;
            q += dv * dv;
        }
    red[threadIdx.y][threadIdx.x] = q;
    __syncthreads();
    if (threadIdx.y == 0 && ok) {
        float qt = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) qt += red[k][threadIdx.x];
        mean[(size_t)b * D + d] = mu;
        stdv[(size_t)b * D + d] = sqrtf(qt / (float)N);
    }
}

extern "C" __global__ void align_add_bf16(bf16_t* __restrict__ x, const bf16_t* __restrict__ f,
                                          const float* __restrict__ mx, const float* __restrict__ sx,
                                          const float* __restrict__ mf, const float* __restrict__ sf,
                                          const float* __restrict__ gate, int B, int N, int D,
                                          float eps) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t total = (size_t)B * N * D;
    if (i >= total) return;
    int d = (int)(i % D);
    int b = (int)(i / ((size_t)N * D));
    size_t k = (size_t)b * D + d;
    float fh = (bf2f(f[i]) - mf[k]) / (sf[k] + eps) * sx[k] + mx[k];
    x[i] = f2bf(bf2f(x[i]) + gate[d] * fh);
}

extern "C" __global__ void layernorm_affine_bf16(const bf16_t* __restrict__ x, bf16_t* __restrict__ out,
                                                 const float* __restrict__ gamma,
                                                 const float* __restrict__ beta, int rows, int D,
                                                 float eps) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16_t* xr = x + (size_t)row * D;
    bf16_t* outr = out + (size_t)row * D;
    float v[8];
    float s = 0.f;
    for (int c = lane * 8; c < D; c += 256) {
        load8(xr + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) s += v[i];
    }
    float mean = warp_sum(s) / (float)D;
    float q = 0.f;
    for (int c = lane * 8; c < D; c += 256) {
        load8(xr + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float d = v[i] - mean;
            q += d * d;
        }
    }
    float rstd = rsqrtf(warp_sum(q) / (float)D + eps);
    for (int c = lane * 8; c < D; c += 256) {
        load8(xr + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = (v[i] - mean) * rstd * gamma[c + i] + beta[c + i];
        store8(outr + c, v);
    }
}
