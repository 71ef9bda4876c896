// VAE GroupNorm(+SiLU), nearest 2x upsample and layout conversions, NHWC bf16 activations.
//
// Layouts
//   Activations: NHWC bf16 x[n][p][c], p = y * W + x the pixel index, HW = H * W, channels
//   contiguous (the layout of kernels/cuda/vae_conv.cu). gamma / beta: f32 [C].
//
// GroupNorm (32 groups, f32 statistics, exact two-pass mean / variance), four launches on one
// stream (each reads what the previous one wrote):
//   1. vae_groupnorm_stats_bf16(x, part, N, HW, C, chunk, pass = 0, eps), grid (nchunks, N)
//        part0[n][chunk_id][g] = sum of x over the chunk's pixels and the group's channels
//   2. vae_groupnorm_stats_bf16(x, part, N, HW, C, chunk, pass = 1, eps), grid (nchunks, N)
//        reduces part0 to the group means, then part1[n][chunk_id][g] = sum (x - mean)^2
//   3. vae_groupnorm_stats_bf16(x, part, N, HW, C, chunk, pass = 2, eps), grid (1, N)
//        final[n][0][g] = mean, final[n][1][g] = rstd = 1 / sqrt(var + eps), var = biased
//        variance (as PyTorch) = sum part1 / (HW * C / 32)
//   4. vae_groupnorm_silu_bf16(x, out, gamma, beta, final, N, HW, C, silu)
//        out = (x - mean) * rstd * gamma[c] + beta[c], then silu(v) = v / (1 + exp(-v)) when
//        silu != 0. out may equal x (in place): each element is read and written by one thread.
//   part: f32 scratch of VAE_GN_PART_FLOATS(N, nchunks) = 2 * N * nchunks * 32 + N * 64 floats
//   (host-allocated, no initialization): part0 = part, part1 = part + N * nchunks * 32,
//   final = part + 2 * N * nchunks * 32 ([N][2][32]: mean, rstd).
//   Requirements: C % 32 == 0, C <= 2048, HW >= 1, x / out 16-byte aligned.
//   Launches (host mirrors the defines):
//     chunk   = max(VAE_GN_MIN_CHUNK, ceil(HW / VAE_GN_MAX_CHUNKS)), nchunks = ceil(HW / chunk)
//               (so nchunks <= VAE_GN_MAX_CHUNKS); the kernel derives nchunks from HW, chunk
//     stats:  grid (nchunks, N) for passes 0 and 1, (1, N) for pass 2; block VAE_GN_THREADS
//             (256); static smem 9.25 KiB
//     apply:  grid (VAE_GN_APPLY_BLOCKS(HW, C), N), block VAE_GN_THREADS; any grid.x >= 1 is
//             correct (grid-stride loop), the define just sizes it; static smem 16 KiB
//
//   C ABI: vae_groupnorm_stats_bf16(const bf16* x, float* part, int N, int HW, int C,
//                                   int chunk, int pass, float eps)
//          vae_groupnorm_silu_bf16(const bf16* x, bf16* out, const float* gamma,
//                                  const float* beta, const float* final_stats, int N, int HW,
//                                  int C, int silu)
//   Resources (ptxas 13.0): stats 40 / 48 registers (sm_90a / sm_80), apply 32, no spills.
//
// vae_upsample2x_nearest_bf16(x, out, N, H, W, C): x [N][H][W][C] -> out [N][2H][2W][C].
//   C % 8 == 0. grid ceil(N*2H*2W*C/8 / 256), block 256. (vae_conv2d_bf16 can also read the
//   upsampled tensor directly with up = 1; this kernel is for the other uses.)
// nchw_f32_to_nhwc_bf16(in, out, N, C, HW), nhwc_bf16_to_nchw_f32(in, out, N, C, HW):
//   one thread per element, grid ceil(N*C*HW / 256), block 256.
//
// Check and benchmark: scripts/build-dev-checks.sh vae -> dist/bin/vae_check (GPU machine).

// Only cuda_bf16.h is included, so that the file also compiles under NVRTC (no system headers).
#include <cuda_bf16.h>

#define VAE_GN_GROUPS 32
#define VAE_GN_THREADS 256
#define VAE_GN_MAX_CHUNKS 256
#define VAE_GN_MIN_CHUNK 32
#define VAE_GN_PART_FLOATS(N, nchunks) (2 * (N) * (nchunks) * 32 + (N) * 64)
// ceil(HW * C / 8 / (4 * 256)), at most 4096: about 4 16-byte vectors per thread.
#define VAE_GN_APPLY_BLOCKS(HW, C)                                  \
    (((HW) * ((C) / 8) + 4 * 256 - 1) / (4 * 256) < 4096            \
         ? ((HW) * ((C) / 8) + 4 * 256 - 1) / (4 * 256)             \
         : 4096)
#define VAE_ELEMWISE_THREADS 256

namespace vae_norm {

typedef __nv_bfloat16 bf16;

struct alignas(16) Vec8 {
    __nv_bfloat162 h[4];
};

__device__ __forceinline__ void unpack8(const Vec8& v, float* f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __low2float(v.h[i]);
        f[2 * i + 1] = __high2float(v.h[i]);
    }
}

// Sums part[n][0..nchunks)[g] for the 32 groups into out[32] (shared), with all 256 threads:
// thread t sums chunks t/32, t/32 + 8, ... of group t % 32, then 8 partials per group are added
// in a fixed order (deterministic). Ends with __syncthreads.
__device__ __forceinline__ void reduce_parts(const float* __restrict__ part, int nchunks,
                                             float* red /* smem [256] */, float* out /* [32] */) {
    const int t = threadIdx.x;
    const int g = t & 31;
    float s = 0.f;
    for (int k = t >> 5; k < nchunks; k += VAE_GN_THREADS / 32) s += part[(size_t)k * 32 + g];
    red[t] = s;
    __syncthreads();
    if (t < 32) {
        float a = 0.f;
#pragma unroll
        for (int r = 0; r < VAE_GN_THREADS / 32; ++r) a += red[r * 32 + t];
        out[t] = a;
    }
    __syncthreads();
}

}  // namespace vae_norm

// Group statistics of one sample (see the header): passes 0 and 1 reduce one chunk of pixels;
// pass 2 turns the partial sums into mean / rstd.
// Thread layout (passes 0, 1): cols = C / 8 threads per pixel (each owns 8 channels),
// rows = 256 / cols pixels at a time; threads >= rows * cols only help with the reductions.
extern "C" __global__ void __launch_bounds__(VAE_GN_THREADS)
    vae_groupnorm_stats_bf16(const __nv_bfloat16* __restrict__ x, float* __restrict__ part,
                             int N, int HW, int C, int chunk, int pass, float eps) {
    using namespace vae_norm;
    __shared__ float chan[VAE_GN_THREADS * 8];  // [rows][C] per-thread channel sums
    __shared__ float red[VAE_GN_THREADS];
    __shared__ float mean[VAE_GN_GROUPS];
    const int n = blockIdx.y;
    const int nchunks = (HW + chunk - 1) / chunk;
    const int t = threadIdx.x;
    const int cols = C / 8;
    const int rows = VAE_GN_THREADS / cols;
    const int cpg = C / VAE_GN_GROUPS;
    const float count = (float)HW * (float)cpg;
    float* part0 = part + (size_t)n * nchunks * VAE_GN_GROUPS;
    float* part1 = part + ((size_t)N + n) * nchunks * VAE_GN_GROUPS;

    if (pass >= 1) {
        reduce_parts(part0, nchunks, red, mean);
        if (t < VAE_GN_GROUPS) mean[t] = mean[t] / count;
        __syncthreads();
    }
    if (pass == 2) {
        __shared__ float sq[VAE_GN_GROUPS];
        reduce_parts(part1, nchunks, red, sq);
        float* fin = part + (size_t)2 * N * nchunks * VAE_GN_GROUPS + (size_t)n * 2 * VAE_GN_GROUPS;
        if (t < VAE_GN_GROUPS) {
            fin[t] = mean[t];
            fin[VAE_GN_GROUPS + t] = rsqrtf(sq[t] / count + eps);
        }
        return;
    }

    const int row = t / cols, col = t - (t / cols) * cols;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    if (row < rows) {
        float mu[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) mu[e] = pass == 1 ? mean[(col * 8 + e) / cpg] : 0.f;
        const int p_begin = blockIdx.x * chunk;
        const int p_end = p_begin + chunk < HW ? p_begin + chunk : HW;
        const Vec8* xv = reinterpret_cast<const Vec8*>(x + (size_t)n * HW * C) + col;
#pragma unroll 4
        for (int p = p_begin + row; p < p_end; p += rows) {
            const Vec8 v = xv[(size_t)p * cols];
            float f[8];
            unpack8(v, f);
            if (pass == 0) {
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] += f[e];
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float d = f[e] - mu[e];
                    acc[e] += d * d;
                }
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) chan[row * C + col * 8 + e] = acc[e];
    }
    __syncthreads();
    // Group g sums chan[r][g*cpg .. g*cpg+cpg) over the rows: rows * cpg = 2048 / 32 = 64
    // values at most (rows * C <= 256 * 8). 8 threads per group, fixed order.
    {
        const int g = t & 31, sub = t >> 5;
        const int cnt = rows * cpg;
        float s = 0.f;
        for (int k = sub; k < cnt; k += 8) {
            const int r = k / cpg, c = k - (k / cpg) * cpg;
            s += chan[r * C + g * cpg + c];
        }
        red[t] = s;
    }
    __syncthreads();
    if (t < 32) {
        float a = 0.f;
#pragma unroll
        for (int r = 0; r < 8; ++r) a += red[r * 32 + t];
        float* dst = pass == 0 ? part0 : part1;
        dst[(size_t)blockIdx.x * VAE_GN_GROUPS + t] = a;
    }
}

// Normalize + affine (+ SiLU). grid (any, N): grid-stride over the sample's 8-channel vectors.
extern "C" __global__ void __launch_bounds__(VAE_GN_THREADS)
    vae_groupnorm_silu_bf16(const __nv_bfloat16* x, __nv_bfloat16* out,
                            const float* __restrict__ gamma, const float* __restrict__ beta,
                            const float* __restrict__ final_stats, int N, int HW, int C,
                            int silu) {
    using namespace vae_norm;
    __shared__ float scale[2048], shift[2048];
    const int n = blockIdx.y;
    const int t = threadIdx.x;
    const int cpg = C / VAE_GN_GROUPS;
    const float* fin = final_stats + (size_t)n * 2 * VAE_GN_GROUPS;
    for (int c = t; c < C; c += VAE_GN_THREADS) {
        const int g = c / cpg;
        const float a = gamma[c] * fin[VAE_GN_GROUPS + g];
        scale[c] = a;
        shift[c] = beta[c] - fin[g] * a;
    }
    __syncthreads();
    const int cols = C / 8;
    const size_t total = (size_t)HW * cols;
    const Vec8* xv = reinterpret_cast<const Vec8*>(x + (size_t)n * HW * C);
    Vec8* ov = reinterpret_cast<Vec8*>(out + (size_t)n * HW * C);
    for (size_t i = (size_t)blockIdx.x * VAE_GN_THREADS + t; i < total;
         i += (size_t)gridDim.x * VAE_GN_THREADS) {
        const int c0 = (int)(i % cols) * 8;
        const Vec8 v = xv[i];
        float f[8];
        unpack8(v, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float y = f[e] * scale[c0 + e] + shift[c0 + e];
            if (silu) y = y / (1.f + __expf(-y));
            f[e] = y;
        }
        Vec8 o;
#pragma unroll
        for (int k = 0; k < 4; ++k) o.h[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
        ov[i] = o;
    }
}

// Nearest-neighbour 2x upsample, NHWC, 16-byte vectors (C % 8 == 0).
extern "C" __global__ void __launch_bounds__(VAE_ELEMWISE_THREADS)
    vae_upsample2x_nearest_bf16(const __nv_bfloat16* __restrict__ x,
                                __nv_bfloat16* __restrict__ out, int N, int H, int W, int C) {
    using namespace vae_norm;
    const int cols = C / 8;
    const size_t total = (size_t)N * (2 * H) * (2 * W) * cols;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int cv = (int)(i % cols);
    const size_t pix = i / cols;
    const int ox = (int)(pix % (2 * W));
    const int oy = (int)((pix / (2 * W)) % (2 * H));
    const size_t img = pix / ((size_t)(2 * W) * (2 * H));
    const Vec8* xv = reinterpret_cast<const Vec8*>(x);
    reinterpret_cast<Vec8*>(out)[i] = xv[((img * H + (oy >> 1)) * W + (ox >> 1)) * cols + cv];
}

// in [N][C][HW] f32 -> out [N][HW][C] bf16 (round to nearest even).
extern "C" __global__ void __launch_bounds__(VAE_ELEMWISE_THREADS)
    nchw_f32_to_nhwc_bf16(const float* __restrict__ in, __nv_bfloat16* __restrict__ out, int N,
                          int C, int HW) {
    const size_t total = (size_t)N * C * HW;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int c = (int)(i % C);
    const size_t p = (i / C) % HW;
    const size_t n = i / ((size_t)C * HW);
    out[i] = __float2bfloat16_rn(in[(n * C + c) * HW + p]);
}

// in [N][HW][C] bf16 -> out [N][C][HW] f32.
extern "C" __global__ void __launch_bounds__(VAE_ELEMWISE_THREADS)
    nhwc_bf16_to_nchw_f32(const __nv_bfloat16* __restrict__ in, float* __restrict__ out, int N,
                          int C, int HW) {
    const size_t total = (size_t)N * C * HW;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const size_t p = i % HW;
    const int c = (int)((i / HW) % C);
    const size_t n = i / ((size_t)C * HW);
    out[i] = __bfloat162float(in[(n * HW + p) * C + c]);
}
