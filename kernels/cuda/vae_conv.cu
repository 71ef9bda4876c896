// VAE convolutions (SD3 VAE encoder/decoder), bf16 activations, f32 accumulation, NHWC.
//
// Layouts
//   Activations: NHWC bf16, x[n][y][x][c] (channels contiguous). The host converts images and
//   latents with the layout kernels of vae_norm.cu (nchw_f32_to_nhwc_bf16 and back).
//   Weights: [Cout][KH][KW][Cin] bf16, i.e. row co holds the K = KH*KW*Cin reduction values of
//   output channel co, taps in row-major (ky, kx) order, Cin contiguous. From PyTorch's
//   [Cout, Cin, KH, KW] tensor w_pt:   w[co][ky][kx][ci] = w_pt[co][ci][ky][kx]
//   (w_pt.permute(0, 2, 3, 1).contiguous(), then cast to bf16).
//   Bias: f32 [Cout] (may be null). Residual: bf16 NHWC with the output's shape (may be null;
//   it may be the same buffer as out: each element is read and then written by one thread).
//   out must not overlap x or w.
//
// What it computes (both kernels, same arguments)
//   out[n][oy][ox][co] = bias[co] + residual[n][oy][ox][co]
//                        + sum_{ky,kx,ci} w[co][ky][kx][ci] * xin(n, oy*stride - pad_t + ky,
//                                                                 ox*stride - pad_l + kx, ci)
//   where xin(n, iy, ix, ci) = 0 outside 0 <= iy < H, 0 <= ix < W, else
//   x[n][iy >> up][ix >> up][ci]: with up = 1 the stored input is the half-resolution tensor
//   [N][H/2][W/2][Cin] and the convolution reads its nearest-neighbour 2x upsampling (H, W even)
//   without materializing it (SD3 decoder Upsample = interpolate(2x, nearest) + conv3x3).
//   The host passes the output size: Ho = (H + pad_t + pad_b - KH) / stride + 1, same for Wo;
//   pad_b / pad_r are implied (taps reading past H or W read zero).
//   SD3 uses: 3x3 stride 1 pad 1 (pad_t = pad_l = 1, Ho = H); the encoder downsampler's
//   F.pad(x, (0, 1, 0, 1)) + 3x3 stride 2 pad 0 (pad_t = pad_l = 0, Ho = (H - 2) / 2 + 1,
//   i.e. H / 2 for even H); 1x1 stride 1 pad 0 (shortcut convs, quant convs).
//
// C ABI (both kernels, extern "C", same parameter list):
//   (const bf16* x, const bf16* w, const float* bias, const bf16* residual, bf16* out,
//    int N, int H, int W, int Cin, int Ho, int Wo, int Cout, int KH, int KW, int stride,
//    int pad_t, int pad_l, int up)
//   H, W: the logical input size (after the fused upsample when up = 1); up is 0 or 1.
//
// Kernels (v1)
//   vae_conv2d_bf16           implicit GEMM on mma.sync m16n8k16 bf16 tensor cores (sm_80+):
//                             GEMM M = N*Ho*Wo output pixels, GEMM N = Cout, K = KH*KW*Cin.
//                             Requires Cin % 32 == 0 and Cout % 8 == 0, x / w / out / residual
//                             16-byte aligned (cudaMalloc'ed buffers are).
//                             CTA tile 128 pixels x 128 output channels x 32 of K, 8 warps
//                             (2 x 4, warp tile 64 x 32), 3-stage cp.async pipeline in
//                             XOR-swizzled shared memory (conflict-free cp.async and ldmatrix),
//                             fused bias + residual epilogue. Every K tile lies inside one
//                             (ky, kx) tap because Cin % 32 == 0.
//   vae_conv2d_generic_bf16   any Cin / Cout (SD3: decoder conv_in 16 -> 512, encoder conv_in
//                             3 -> 128, decoder conv_out 128 -> 3), one thread per output
//                             element, f32 loop (16-byte loads when Cin % 8 == 0; x / w then
//                             16-byte aligned). Correct first; not fast.
//
// Launch configuration (host mirrors these defines)
//   vae_conv2d_bf16:
//     grid  = ( ceil(M / VAE_CONV_BLOCK_M) * ceil(Cout / VAE_CONV_BLOCK_N), 1, 1 )
//             (block b -> n-tile b % ceil(Cout / BLOCK_N), m-tile b / ceil(Cout / BLOCK_N))
//     block = ( VAE_CONV_THREADS, 1, 1 )                   = 256
//     dynamic shared memory = VAE_CONV_SMEM_BYTES         = 49152 (default limit, no opt-in)
//     M = N*Ho*Wo must be < 2^31; Cout <= 65535.
//   vae_conv2d_generic_bf16:
//     grid = ( ceil(N*Ho*Wo*Cout / VAE_CONV_GENERIC_THREADS), 1, 1 ), block = 256, no smem.
//
// Resources (ptxas 13.0, -O3): vae_conv2d_bf16 128 registers (sm_90a) / 126 (sm_80), no
//   spills, 2 CTAs per SM; vae_conv2d_generic_bf16 40 registers, no spills.
// Later: wgmma/TMA version for sm_90a, 4-stage pipeline (needs the > 48 KiB smem opt-in),
//   smaller N tile for Cout <= 64, staged 16-byte epilogue stores.
//
// Check and benchmark: scripts/build-dev-checks.sh vae -> dist/bin/vae_check (GPU machine).

// Only cuda_bf16.h is included, so that the file also compiles under NVRTC (no system headers).
#include <cuda_bf16.h>

#define VAE_CONV_BLOCK_M 128
#define VAE_CONV_BLOCK_N 128
#define VAE_CONV_BLOCK_K 32
#define VAE_CONV_STAGES 3
#define VAE_CONV_THREADS 256
// STAGES * (BLOCK_M + BLOCK_N) * BLOCK_K * sizeof(bf16)
#define VAE_CONV_SMEM_BYTES \
    (VAE_CONV_STAGES * (VAE_CONV_BLOCK_M + VAE_CONV_BLOCK_N) * VAE_CONV_BLOCK_K * 2)
#define VAE_CONV_GENERIC_THREADS 256

namespace vae_conv {

typedef __nv_bfloat16 bf16;
typedef unsigned int u32;

// ---------------------------------------------------------------------------------------------
// PTX helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_u32(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills the destination (src not read).
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most VAE_CONV_STAGES - 2 committed groups are still pending.
__device__ __forceinline__ void cp_async_wait_pipeline() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(VAE_CONV_STAGES - 2) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// d += a * b, m16n8k16, row.col, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// Shared-memory tile layout
// ---------------------------------------------------------------------------------------------
// One stage holds A [BLOCK_M rows][32 bf16] and B [BLOCK_N rows][32 bf16]; a row is 64 bytes =
// 4 chunks of 16 bytes. Chunk c of row r is stored at chunk position c ^ ((r >> 1) & 3): the 8
// rows an ldmatrix phase reads (same logical chunk) then hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ u32 tile_off(int row, int chunk) {
    return (u32)(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
}

// lo * lo + hi * hi of two packed bf16 pairs, in f32 (bf16 -> f32 is a 16-bit shift).
__device__ __forceinline__ float dot_bf16x2(u32 a, u32 b) {
    return __uint_as_float(a << 16) * __uint_as_float(b << 16) +
           __uint_as_float(a & 0xffff0000u) * __uint_as_float(b & 0xffff0000u);
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// ---------------------------------------------------------------------------------------------
// Implicit-GEMM tensor-core convolution
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void conv_body(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          const float* __restrict__ bias, const bf16* residual,
                                          bf16* out, int N, int H, int W, int Cin, int Ho, int Wo,
                                          int Cout, int KH, int KW, int stride, int pad_t,
                                          int pad_l, int up) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int M = N * Ho * Wo;
    const int n_tiles = (Cout + VAE_CONV_BLOCK_N - 1) / VAE_CONV_BLOCK_N;
    const int m0 = (int)(blockIdx.x / n_tiles) * VAE_CONV_BLOCK_M;
    const int n0 = (int)(blockIdx.x % n_tiles) * VAE_CONV_BLOCK_N;
    const int K = KH * KW * Cin;
    const int c_tiles = Cin / VAE_CONV_BLOCK_K;
    const int k_tiles = KH * KW * c_tiles;
    const int Hs = H >> up, Ws = W >> up;  // stored input size

    const u32 smem_base = smem_u32(smem_raw);
    const u32 a_stage_bytes = VAE_CONV_BLOCK_M * VAE_CONV_BLOCK_K * 2;
    const u32 b_stage_bytes = VAE_CONV_BLOCK_N * VAE_CONV_BLOCK_K * 2;
    const u32 a_base = smem_base;
    const u32 b_base = smem_base + VAE_CONV_STAGES * a_stage_bytes;

    // Each thread copies 2 A chunks and 2 B chunks per stage: chunk id = tid + i * 256,
    // row = id >> 2 (0..127), chunk = id & 3 (the same for both i).
    const int ld_chunk = tid & 3;
    int a_row_img[2], a_iy0[2], a_ix0[2];  // image index (-1: row beyond M), top-left tap
    const bf16* b_row_ptr[2];
    bool b_row_ok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = (tid >> 2) + i * 64;
        const int m = m0 + row;
        if (m < M) {
            const int img = m / (Ho * Wo);
            const int rem = m - img * (Ho * Wo);
            const int oy = rem / Wo, ox = rem - (rem / Wo) * Wo;
            a_row_img[i] = img;
            a_iy0[i] = oy * stride - pad_t;
            a_ix0[i] = ox * stride - pad_l;
        } else {
            a_row_img[i] = -1;
            a_iy0[i] = 0;
            a_ix0[i] = 0;
        }
        const int co = n0 + row;
        b_row_ok[i] = co < Cout;
        b_row_ptr[i] = w + (size_t)(b_row_ok[i] ? co : 0) * K + ld_chunk * 8;
    }

    auto load_tile = [&](int kt, int stage) {
        const int tap = kt / c_tiles;
        const int c0 = (kt - tap * c_tiles) * VAE_CONV_BLOCK_K;
        const int ky = tap / KW, kx = tap - (tap / KW) * KW;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = (tid >> 2) + i * 64;
            const int iy = a_iy0[i] + ky, ix = a_ix0[i] + kx;
            const bool ok = a_row_img[i] >= 0 && iy >= 0 && iy < H && ix >= 0 && ix < W;
            const bf16* src = x;
            if (ok)
                src = x + ((((size_t)a_row_img[i] * Hs + (iy >> up)) * Ws + (ix >> up)) * Cin +
                           c0 + ld_chunk * 8);
            cp_async_16(a_base + stage * a_stage_bytes + tile_off(row, ld_chunk), src,
                        ok ? 16 : 0);
            const bf16* wsrc = b_row_ok[i] ? b_row_ptr[i] + (size_t)kt * VAE_CONV_BLOCK_K : w;
            cp_async_16(b_base + stage * b_stage_bytes + tile_off(row, ld_chunk), wsrc,
                        b_row_ok[i] ? 16 : 0);
        }
    };

    // Warp tile: 64 rows (4 m16 tiles) x 32 columns (4 n8 tiles); warps 2 (M) x 4 (N).
    const int wm = (warp >> 2) * 64;
    const int wn = (warp & 3) * 32;
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
    for (int s = 0; s < VAE_CONV_STAGES - 1; ++s) {
        if (s < k_tiles) load_tile(s, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait_pipeline();
        __syncthreads();  // tile kt visible to all; stage (kt - 1) % STAGES free
        {
            const int next = kt + VAE_CONV_STAGES - 1;
            if (next < k_tiles) load_tile(next, next % VAE_CONV_STAGES);
            cp_async_commit();
        }
        const int stage = kt % VAE_CONV_STAGES;
        const u32 a_st = a_base + stage * a_stage_bytes;
        const u32 b_st = b_base + stage * b_stage_bytes;
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {  // two k16 steps per 32-wide K tile
            u32 af[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15)
                const int row = wm + i * 16 + (lane & 15);
                const int chunk = ks * 2 + (lane >> 4);
                ldmatrix_x4(a_st + tile_off(row, chunk), af[i][0], af[i][1], af[i][2], af[i][3]);
            }
            u32 bfr[4][2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                const int row = wn + j * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int chunk = ks * 2 + ((lane >> 3) & 1);
                ldmatrix_x4(b_st + tile_off(row, chunk), bfr[2 * j][0], bfr[2 * j][1],
                            bfr[2 * j + 1][0], bfr[2 * j + 1][1]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
        }
    }
    cp_async_wait_all();  // only empty groups can be pending here; drain before exit

    // Epilogue: accumulator (i, j, e): row wm + 16 i + lane / 4 + 8 (e >> 1),
    // column wn + 8 j + 2 (lane % 4) + (e & 1). Cout % 8 == 0, so a column pair is in range
    // together and its 4-byte store is aligned.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int co = n0 + wn + j * 8 + 2 * (lane & 3);
        if (co >= Cout) continue;
        float b0 = 0.f, b1 = 0.f;
        if (bias != nullptr) {
            b0 = bias[co];
            b1 = bias[co + 1];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int m = m0 + wm + i * 16 + (lane >> 2) + h * 8;
                if (m >= M) continue;
                float v0 = acc[i][j][2 * h] + b0, v1 = acc[i][j][2 * h + 1] + b1;
                const size_t o = (size_t)m * Cout + co;
                if (residual != nullptr) {
                    const __nv_bfloat162 r = *reinterpret_cast<const __nv_bfloat162*>(residual + o);
                    v0 += __bfloat162float(r.x);
                    v1 += __bfloat162float(r.y);
                }
                *reinterpret_cast<u32*>(out + o) = pack_bf16x2(v0, v1);
            }
        }
    }
}

}  // namespace vae_conv

extern "C" __global__ void __launch_bounds__(VAE_CONV_THREADS, 2)
    vae_conv2d_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                    const float* __restrict__ bias, const __nv_bfloat16* residual,
                    __nv_bfloat16* out, int N, int H, int W, int Cin, int Ho, int Wo, int Cout,
                    int KH, int KW, int stride, int pad_t, int pad_l, int up) {
    vae_conv::conv_body(x, w, bias, residual, out, N, H, W, Cin, Ho, Wo, Cout, KH, KW, stride,
                        pad_t, pad_l, up);
}

// Generic fallback: one thread per output element (co fastest, so a warp shares input pixels).
extern "C" __global__ void __launch_bounds__(VAE_CONV_GENERIC_THREADS)
    vae_conv2d_generic_bf16(const __nv_bfloat16* __restrict__ x,
                            const __nv_bfloat16* __restrict__ w, const float* __restrict__ bias,
                            const __nv_bfloat16* residual, __nv_bfloat16* out, int N, int H,
                            int W, int Cin, int Ho, int Wo, int Cout, int KH, int KW, int stride,
                            int pad_t, int pad_l, int up) {
    const size_t total = (size_t)N * Ho * Wo * Cout;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int co = (int)(idx % Cout);
    const size_t m = idx / Cout;
    const int ox = (int)(m % Wo);
    const int oy = (int)((m / Wo) % Ho);
    const int img = (int)(m / ((size_t)Wo * Ho));
    const int Hs = H >> up, Ws = W >> up;
    float acc = bias != nullptr ? bias[co] : 0.f;
    const __nv_bfloat16* wr = w + (size_t)co * KH * KW * Cin;
    for (int ky = 0; ky < KH; ++ky) {
        const int iy = oy * stride - pad_t + ky;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < KW; ++kx) {
            const int ix = ox * stride - pad_l + kx;
            if (ix < 0 || ix >= W) continue;
            const __nv_bfloat16* xp =
                x + (((size_t)img * Hs + (iy >> up)) * Ws + (ix >> up)) * Cin;
            const __nv_bfloat16* wp = wr + (size_t)(ky * KW + kx) * Cin;
            if ((Cin & 7) == 0) {  // 16-byte vectors (rows start 16-byte aligned)
                for (int ci = 0; ci < Cin; ci += 8) {
                    const uint4 xv = *reinterpret_cast<const uint4*>(xp + ci);
                    const uint4 wv = *reinterpret_cast<const uint4*>(wp + ci);
                    acc += vae_conv::dot_bf16x2(xv.x, wv.x) + vae_conv::dot_bf16x2(xv.y, wv.y) +
                           vae_conv::dot_bf16x2(xv.z, wv.z) + vae_conv::dot_bf16x2(xv.w, wv.w);
                }
            } else {
                for (int ci = 0; ci < Cin; ++ci)
                    acc += __bfloat162float(xp[ci]) * __bfloat162float(wp[ci]);
            }
        }
    }
    if (residual != nullptr) acc += __bfloat162float(residual[idx]);
    out[idx] = __float2bfloat16_rn(acc);
}
