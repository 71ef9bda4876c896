// check_common.cuh: host-side pieces shared by the standalone kernel check programs
// (kernels/dev/*_check.cu, built by scripts/build-dev-checks.sh): the CUDA error check,
// host bf16 conversion (round to nearest even) and the measured cuBLAS bf16 GEMM ceiling.
#pragma once

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <library_types.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define cudaCheck(call)                                                                    \
    do {                                                                                   \
        cudaError_t err_ = (call);                                                         \
        if (err_ != cudaSuccess) {                                                         \
            fprintf(stderr, "[CUDA ERROR] %s:%d: %s: %s\n", __FILE__, __LINE__, #call,      \
                    cudaGetErrorString(err_));                                             \
            exit(2);                                                                       \
        }                                                                                  \
    } while (0)

static uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// ------------------------------------------------------------------------------------------
// Ceiling: cuBLAS bf16 GEMM 8192^3 through dlopen (no link-time dependency on cuBLAS)
// ------------------------------------------------------------------------------------------
typedef int (*cublasCreate_t)(void**);
typedef int (*cublasDestroy_t)(void*);
typedef int (*cublasGemmEx_t)(void*, int, int, int, int, int, const void*, const void*, int, int,
                              const void*, int, int, const void*, void*, int, int, int, int);

static double cublas_ceiling_tflops(void) {
    const char* names[] = {"libcublas.so.13", "libcublas.so", "/usr/local/cuda/lib64/libcublas.so.13",
                           "/usr/local/cuda/lib64/libcublas.so", "libcublas.so.12"};
    void* lib = nullptr;
    for (const char* n : names)
        if ((lib = dlopen(n, RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    if (!lib) return -1;
    cublasCreate_t create = (cublasCreate_t)dlsym(lib, "cublasCreate_v2");
    cublasDestroy_t destroy = (cublasDestroy_t)dlsym(lib, "cublasDestroy_v2");
    cublasGemmEx_t gemm = (cublasGemmEx_t)dlsym(lib, "cublasGemmEx");
    if (!create || !destroy || !gemm) return -1;
    void* handle = nullptr;
    if (create(&handle) != 0) return -1;
    const int n = 8192;
    void *A, *Bm, *C;
    cudaCheck(cudaMalloc(&A, (size_t)n * n * 2));
    cudaCheck(cudaMalloc(&Bm, (size_t)n * n * 2));
    cudaCheck(cudaMalloc(&C, (size_t)n * n * 2));
    cudaCheck(cudaMemset(A, 0x3c, (size_t)n * n * 2));   // ~0.0115 in bf16
    cudaCheck(cudaMemset(Bm, 0x3c, (size_t)n * n * 2));
    const float alpha = 1.f, beta = 0.f;
    const int CUBLAS_OP_N_ = 0, CUBLAS_COMPUTE_32F_ = 68, CUBLAS_GEMM_DEFAULT_ = -1;
    double best = -1;
    int st = 0;
    for (int i = 0; i < 3 && st == 0; ++i)
        st = gemm(handle, CUBLAS_OP_N_, CUBLAS_OP_N_, n, n, n, &alpha, A, CUDA_R_16BF, n, Bm,
                  CUDA_R_16BF, n, &beta, C, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F_, CUBLAS_GEMM_DEFAULT_);
    if (st == 0) {
        cudaEvent_t e0, e1;
        cudaCheck(cudaEventCreate(&e0));
        cudaCheck(cudaEventCreate(&e1));
        const int iters = 10;
        cudaCheck(cudaEventRecord(e0));
        for (int i = 0; i < iters; ++i)
            gemm(handle, CUBLAS_OP_N_, CUBLAS_OP_N_, n, n, n, &alpha, A, CUDA_R_16BF, n, Bm,
                 CUDA_R_16BF, n, &beta, C, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F_, CUBLAS_GEMM_DEFAULT_);
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        float ms = 0;
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        best = 2.0 * n * (double)n * n * iters / (ms * 1e-3) / 1e12;
        cudaCheck(cudaEventDestroy(e0));
        cudaCheck(cudaEventDestroy(e1));
    }
    destroy(handle);
    cudaCheck(cudaFree(A));
    cudaCheck(cudaFree(Bm));
    cudaCheck(cudaFree(C));
    return best;
}
