// act.cu: element-wise activations, conversions, the timestep embedding and row softmax.
//
// Kernels (`extern "C"`, bf16 carried as u16, f32 math):
//   gelu_tanh_bf16(x, n)          in place, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   silu_bf16(x, y, n)            y = x * sigmoid(x) (y may equal x)
//   quick_gelu_bf16(x, n)         in place, x * sigmoid(1.702 x) (CLIP)
//   add_bf16(a, b, out, n)        out = a + b
//   f32_to_bf16(x, y, n)          round to nearest even
//   bf16_to_f32(x, y, n)
//   timestep_embedding_bf16(t, out, B, dim, max_period)
//                                 out[b] = [cos(t f_0..f_{h-1}), sin(t f_0..)], f_i = exp(-ln(P) i / h),
//                                 h = dim / 2 (odd dim: last column 0), as SD3's `timestep_embedding`.
//   softmax_rows_bf16(s, rows, cols, scale)
//                                 in place, softmax(scale * s) per row (f32 math); one block per row.
//   softmax_rows_f32_bf16(s, p, rows, cols, scale)
//                                 p = softmax(scale * s) per row: f32 scores s [rows, cols] (the
//                                 unfused attention's QK^T, written f32 by cuBLASLt) -> bf16
//                                 probabilities p [rows, cols] (a separate buffer); one block per row.
// Launch shapes: element-wise kernels take one element per thread, block 256, grid
// ceil(n / 256) (any n); timestep: block 256, grid ceil(B * dim / 256); softmax (both): block
// 256, grid rows.
// Resources: timestep_embedding_bf16 shows a 32-byte stack frame and no spills: it is the
// local buffer of cosf/sinf's slow-path argument reduction (|t f| up to 1000 rad).
// Versions: v1. Check: engine/tests/cuda_kernels.rs.
#include "common.cuh"

__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    return 0.5f * x * (1.f + tanhf(k0 * (x + k1 * x * x * x)));
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }

extern "C" __global__ void gelu_tanh_bf16(bf16_t* __restrict__ x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = f2bf(gelu_tanh_f(bf2f(x[i])));
}

extern "C" __global__ void silu_bf16(const bf16_t* x, bf16_t* y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = bf2f(x[i]);
        y[i] = f2bf(v * sigmoid_f(v));
    }
}

extern "C" __global__ void quick_gelu_bf16(bf16_t* __restrict__ x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = bf2f(x[i]);
        x[i] = f2bf(v * sigmoid_f(1.702f * v));
    }
}

extern "C" __global__ void add_bf16(const bf16_t* a, const bf16_t* b, bf16_t* out, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f2bf(bf2f(a[i]) + bf2f(b[i]));
}

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2bf(x[i]);
}

extern "C" __global__ void bf16_to_f32(const bf16_t* __restrict__ x, float* __restrict__ y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = bf2f(x[i]);
}

extern "C" __global__ void timestep_embedding_bf16(const float* __restrict__ t, bf16_t* __restrict__ out,
                                                   int B, int dim, float max_period) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * dim) return;
    int b = i / dim, c = i % dim;
    int half = dim / 2;
    float v = 0.f;
    if (c < 2 * half) {
        int k = c < half ? c : c - half;
        float freq = expf(-logf(max_period) * (float)k / (float)half);
        float arg = t[b] * freq;
        v = c < half ? cosf(arg) : sinf(arg);
    }
    out[i] = f2bf(v);
}

extern "C" __global__ void softmax_rows_bf16(bf16_t* __restrict__ s, int rows, int cols, float scale) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    bf16_t* r = s + (size_t)row * cols;
    float m = __int_as_float(0xff800000);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, bf2f(r[c]) * scale);
    m = block_max(m, scratch);
    float sum = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += __expf(bf2f(r[c]) * scale - m);
    sum = block_sum(sum, scratch);
    float inv = 1.f / sum;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) r[c] = f2bf(__expf(bf2f(r[c]) * scale - m) * inv);
}

extern "C" __global__ void softmax_rows_f32_bf16(const float* __restrict__ s, bf16_t* __restrict__ p,
                                                 int rows, int cols, float scale) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* r = s + (size_t)row * cols;
    bf16_t* o = p + (size_t)row * cols;
    float m = __int_as_float(0xff800000);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, r[c] * scale);
    m = block_max(m, scratch);
    float sum = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += __expf(r[c] * scale - m);
    sum = block_sum(sum, scratch);
    float inv = 1.f / sum;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = f2bf(__expf(r[c] * scale - m) * inv);
}
