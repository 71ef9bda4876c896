// vae.cu: the VAE's non-GEMM ops (bf16 storage, f32 math), NCHW layout.
//
// Kernels (`extern "C"`, bf16 carried as u16):
//   group_norm_silu_bf16(x, out, gamma, beta, B, C, HW, G, eps, silu)
//       GroupNorm(G groups, f32 affine gamma/beta [C]) and, when silu != 0, SiLU, one pass of
//       writes after two passes of reads; one block per (sample, group).
//       launch: block 256, grid B * G.
//   upsample_nearest2x_bf16(x, out, BC, H, W)    out [BC, 2H, 2W]; block 256, grid ceil(n / 256).
//   im2col3x3_bf16(x, out, B, C, H, W, stride, pad_t, pad_l, pad_b, pad_r)
//       x [B, C, H, W] -> out [B * Ho * Wo, C * 9] (column order (c, ky, kx) = flattened conv
//       weight); zero padding; SD3's downsampler uses stride 2 with pads (0, 0, 1, 1).
//       block 256, grid ceil(n / 256).
// Versions: v1 (im2col + cuBLASLt GEMM as the first conv; implicit GEMM later).
// Check: engine/tests/cuda_kernels.rs.
#include "common.cuh"

extern "C" __global__ void group_norm_silu_bf16(const bf16_t* __restrict__ x, bf16_t* __restrict__ out,
                                                const float* __restrict__ gamma,
                                                const float* __restrict__ beta, int B, int C, int HW,
                                                int G, float eps, int silu) {
    __shared__ float scratch[32];
    int bg = blockIdx.x;
    int b = bg / G, g = bg % G;
    int cpg = C / G;
    size_t n = (size_t)cpg * HW;
    size_t base = ((size_t)b * C + (size_t)g * cpg) * HW;
    float s = 0.f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) s += bf2f(x[base + i]);
    float mean = block_sum(s, scratch) / (float)n;
    float q = 0.f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        float d = bf2f(x[base + i]) - mean;
        q += d * d;
    }
    float rstd = rsqrtf(block_sum(q, scratch) / (float)n + eps);
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        int c = g * cpg + (int)(i / HW);
        float v = (bf2f(x[base + i]) - mean) * rstd * gamma[c] + beta[c];
        if (silu) v = v / (1.f + __expf(-v));
        out[base + i] = f2bf(v);
    }
}

extern "C" __global__ void upsample_nearest2x_bf16(const bf16_t* __restrict__ x, bf16_t* __restrict__ out,
                                                   int BC, int H, int W) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t total = (size_t)BC * 4 * H * W;
    if (i >= total) return;
    int ox = (int)(i % (2 * W));
    int oy = (int)((i / (2 * W)) % (2 * H));
    size_t bc = i / ((size_t)4 * H * W);
    out[i] = x[(bc * H + oy / 2) * W + ox / 2];
}

extern "C" __global__ void im2col3x3_bf16(const bf16_t* __restrict__ x, bf16_t* __restrict__ out, int B,
                                          int C, int H, int W, int stride, int pad_t, int pad_l,
                                          int pad_b, int pad_r) {
    int Ho = (H + pad_t + pad_b - 3) / stride + 1;
    int Wo = (W + pad_l + pad_r - 3) / stride + 1;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t K = (size_t)C * 9;
    size_t total = (size_t)B * Ho * Wo * K;
    if (i >= total) return;
    int col = (int)(i % K);
    size_t tok = i / K;
    int ox = (int)(tok % Wo);
    int oy = (int)((tok / Wo) % Ho);
    int b = (int)(tok / ((size_t)Wo * Ho));
    int kx = col % 3, ky = (col / 3) % 3, c = col / 9;
    int iy = oy * stride + ky - pad_t, ix = ox * stride + kx - pad_l;
    bf16_t v = 0;
    if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = x[(((size_t)b * C + c) * H + iy) * W + ix];
    out[i] = v;
}
