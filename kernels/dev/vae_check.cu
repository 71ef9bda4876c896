// Check and benchmark of the VAE kernels (kernels/cuda/vae_conv.cu, kernels/cuda/vae_norm.cu).
//
// What it does
//   1. Prints the device, then each kernel's registers, local memory and CTAs per SM.
//   2. Validates every kernel against a plain CPU f32 reference computed from the same
//      bf16-rounded inputs: output buffers (and a guard region after each) are poisoned with NaN
//      before every launch, so an element left unwritten or written out of bounds fails.
//      Metric: max |out - ref| / max |ref| <= 1e-2 (bf16 outputs), no NaN/Inf, guard intact.
//      Convolutions: the tensor-core kernel where it applies (Cin % 32 == 0, Cout % 8 == 0) and
//      the generic kernel on every validation shape; three epilogues: bias only, bias +
//      residual in place (out == residual), residual in a separate buffer without bias.
//      GroupNorm with and without SiLU (inputs with per-channel means of 2..6 against a spread
//      of +-1, to catch cancellation). Upsample, layout round trips (exact).
//      The benchmark shapes are validated too, on sampled output pixels (every element is still
//      NaN-checked).
//   3. Times the SD3-sized cases with CUDA events, L2 flushed (memset of twice its size) before
//      every iteration: convolutions in TFLOP/s (2 * M * Cout * K) beside a measured ceiling
//      (cuBLAS bf16 GEMM 8192^3 when libcublas can be dlopen'ed, else the 798 TFLOP/s measured
//      on the H100); GroupNorm in GB/s of one read + one write of the tensor (the kernels read
//      it three times) beside a device-to-device copy.
//   One line per case: "PASS|FAIL <kernel> <shape> err=..". Exit code non-zero when any case
//   fails. `--quick`: validation shapes only, no timing.
//
// Build (no GPU needed):  scripts/build-dev-checks.sh vae -> dist/bin/vae_check
// Run (GPU machine):      dist/bin/vae_check            (about 10-30 s)

#include "../cuda/vae_conv.cu"
#include "../cuda/vae_norm.cu"

#include "check_common.cuh"

#include <math.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

typedef __nv_bfloat16 bf16;

static const size_t kGuard = 4096;  // poisoned elements after each output buffer
static const double kTol = 1e-2;

// ------------------------------------------------------------------------------------------
// Random numbers, threads
// ------------------------------------------------------------------------------------------
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint32_t next() {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        return (uint32_t)((s * 0x2545F4914F6CDD1Dull) >> 32);
    }
    float uniform(float lo, float hi) { return lo + (hi - lo) * (next() >> 8) * (1.0f / 16777216.0f); }
};
static std::vector<uint16_t> rand_bf16(size_t n, float lo, float hi, uint64_t seed) {
    Rng r(seed);
    std::vector<uint16_t> v(n);
    for (auto& e : v) e = f2bf(r.uniform(lo, hi));
    return v;
}
template <class F>
static void parallel_for(size_t n, F f) {
    unsigned nt = std::max(1u, std::min(64u, std::thread::hardware_concurrency()));
    std::vector<std::thread> th;
    for (unsigned t = 0; t < nt; ++t)
        th.emplace_back([=, &f] {
            for (size_t i = t; i < n; i += nt) f(i);
        });
    for (auto& t : th) t.join();
}

// Device buffer of n elements + a guard, all poisoned with 0xFF bytes (bf16 / f32 NaN).
template <class T>
struct DBuf {
    T* d = nullptr;
    size_t n = 0;
    explicit DBuf(size_t n_) : n(n_) { cudaCheck(cudaMalloc(&d, (n + kGuard) * sizeof(T))); }
    ~DBuf() { cudaFree(d); }
    DBuf(const DBuf&) = delete;
    DBuf& operator=(const DBuf&) = delete;
    void poison() { cudaCheck(cudaMemset(d, 0xff, (n + kGuard) * sizeof(T))); }
    void upload(const std::vector<T>& h) {
        poison();
        cudaCheck(cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    }
    std::vector<T> download_all() const {
        std::vector<T> h(n + kGuard);
        cudaCheck(cudaMemcpy(h.data(), d, (n + kGuard) * sizeof(T), cudaMemcpyDeviceToHost));
        return h;
    }
};
template <class T>
static bool guard_intact(const std::vector<T>& h, size_t n) {
    for (size_t i = n; i < h.size(); ++i) {
        const unsigned char* b = reinterpret_cast<const unsigned char*>(&h[i]);
        for (size_t k = 0; k < sizeof(T); ++k)
            if (b[k] != 0xff) return false;
    }
    return true;
}

struct Err {
    double max_err = 0, max_ref = 0;
    size_t nonfinite = 0;
    bool guard = true;
    double rel() const { return max_ref > 0 ? max_err / max_ref : max_err; }
    bool ok(double tol) const { return nonfinite == 0 && guard && rel() <= tol; }
};
static int g_failures = 0;
static void report(bool ok, const char* kernel, const char* shape, const Err& e) {
    printf("%s %-28s %-44s err=%.3e (max|ref| %.3g)%s%s\n", ok ? "PASS" : "FAIL", kernel, shape,
           e.rel(), e.max_ref, e.nonfinite ? " NON-FINITE" : "", e.guard ? "" : " GUARD-OVERWRITTEN");
    if (!ok) ++g_failures;
    fflush(stdout);
}

// ------------------------------------------------------------------------------------------
// Convolution
// ------------------------------------------------------------------------------------------
struct ConvShape {
    int N, Cin, Cout, H, W;  // H, W: logical input size (after the fused upsample when up = 1)
    int K, stride, pad_t, pad_l, pad_b, pad_r, up;
    int Ho() const { return (H + pad_t + pad_b - K) / stride + 1; }
    int Wo() const { return (W + pad_l + pad_r - K) / stride + 1; }
    size_t in_elems() const { return (size_t)N * (H >> up) * (W >> up) * Cin; }
    size_t out_elems() const { return (size_t)N * Ho() * Wo() * Cout; }
    size_t w_elems() const { return (size_t)Cout * K * K * Cin; }
    double flops() const { return 2.0 * N * Ho() * Wo() * (double)Cout * K * K * Cin; }
    bool fast_ok() const { return Cin % 32 == 0 && Cout % 8 == 0; }
    void str(char* b, size_t n, int res_mode) const {
        static const char* res_names[3] = {"", " +res(in place)", " +res(separate) no bias"};
        snprintf(b, n, "N=%d %d->%d %dx%d k%d s%d%s%s", N, Cin, Cout, H >> up, W >> up, K, stride,
                 up ? " up2x" : "", res_names[res_mode]);
    }
};
static ConvShape conv3(int N, int ci, int co, int H, int W) { return {N, ci, co, H, W, 3, 1, 1, 1, 1, 1, 0}; }
static ConvShape conv1(int N, int ci, int co, int H, int W) { return {N, ci, co, H, W, 1, 1, 0, 0, 0, 0, 0}; }
static ConvShape down(int N, int ci, int co, int H, int W) { return {N, ci, co, H, W, 3, 2, 0, 0, 1, 1, 0}; }
static ConvShape up3(int N, int ci, int co, int Hs, int Ws) { return {N, ci, co, 2 * Hs, 2 * Ws, 3, 1, 1, 1, 1, 1, 1}; }

struct ConvData {
    ConvShape s;
    std::vector<uint16_t> x, w, res;
    std::vector<float> bias;
    DBuf<uint16_t> dx, dw, dout;
    DBuf<float> dbias;
    ConvData(const ConvShape& s_, uint64_t seed)
        : s(s_), dx(s_.in_elems()), dw(s_.w_elems()), dout(s_.out_elems()), dbias(s_.Cout) {
        x = rand_bf16(s.in_elems(), -1.f, 1.f, seed);
        const float wscale = 1.0f / sqrtf((float)s.K * s.K * s.Cin) * 1.7f;
        w = rand_bf16(s.w_elems(), -wscale, wscale, seed + 1);
        res = rand_bf16(s.out_elems(), -1.f, 1.f, seed + 2);
        Rng r(seed + 3);
        bias.resize(s.Cout);
        for (auto& b : bias) b = r.uniform(-0.5f, 0.5f);
        dx.upload(x);
        dw.upload(w);
        dbias.upload(bias);
    }
};

static void launch_conv(const ConvData& d, bool fast, const uint16_t* residual_dev, uint16_t* out,
                        bool no_bias = false, cudaStream_t st = 0) {
    const ConvShape& s = d.s;
    const int Ho = s.Ho(), Wo = s.Wo();
    const long long M = (long long)s.N * Ho * Wo;
    const bf16* x = reinterpret_cast<const bf16*>(d.dx.d);
    const bf16* w = reinterpret_cast<const bf16*>(d.dw.d);
    const bf16* r = reinterpret_cast<const bf16*>(residual_dev);
    bf16* o = reinterpret_cast<bf16*>(out);
    const float* bias = no_bias ? nullptr : d.dbias.d;
    if (fast) {
        const long long mt = (M + VAE_CONV_BLOCK_M - 1) / VAE_CONV_BLOCK_M;
        const long long nt = (s.Cout + VAE_CONV_BLOCK_N - 1) / VAE_CONV_BLOCK_N;
        vae_conv2d_bf16<<<(unsigned)(mt * nt), VAE_CONV_THREADS, VAE_CONV_SMEM_BYTES, st>>>(
            x, w, bias, r, o, s.N, s.H, s.W, s.Cin, Ho, Wo, s.Cout, s.K, s.K, s.stride,
            s.pad_t, s.pad_l, s.up);
    } else {
        const long long total = M * s.Cout;
        vae_conv2d_generic_bf16<<<(unsigned)((total + VAE_CONV_GENERIC_THREADS - 1) /
                                              VAE_CONV_GENERIC_THREADS),
                                  VAE_CONV_GENERIC_THREADS, 0, st>>>(
            x, w, bias, r, o, s.N, s.H, s.W, s.Cin, Ho, Wo, s.Cout, s.K, s.K, s.stride,
            s.pad_t, s.pad_l, s.up);
    }
    cudaCheck(cudaGetLastError());
}

// CPU reference for output pixel m (all Cout channels) into ref[Cout].
// Residual modes of a convolution check.
enum ResMode { RES_NONE = 0, RES_IN_PLACE = 1, RES_SEPARATE_NO_BIAS = 2 };

static void conv_ref_pixel(const ConvData& d, ResMode mode, size_t m, float* ref) {
    const ConvShape& s = d.s;
    const int Ho = s.Ho(), Wo = s.Wo(), Hs = s.H >> s.up, Ws = s.W >> s.up;
    const int ox = (int)(m % Wo), oy = (int)((m / Wo) % Ho), n = (int)(m / ((size_t)Wo * Ho));
    std::vector<float> xin((size_t)s.K * s.K * s.Cin, 0.f);
    for (int ky = 0; ky < s.K; ++ky)
        for (int kx = 0; kx < s.K; ++kx) {
            const int iy = oy * s.stride - s.pad_t + ky, ix = ox * s.stride - s.pad_l + kx;
            if (iy < 0 || iy >= s.H || ix < 0 || ix >= s.W) continue;
            const uint16_t* xp = &d.x[(((size_t)n * Hs + (iy >> s.up)) * Ws + (ix >> s.up)) * s.Cin];
            for (int c = 0; c < s.Cin; ++c) xin[((size_t)ky * s.K + kx) * s.Cin + c] = bf2f(xp[c]);
        }
    const size_t Kt = xin.size();
    for (int co = 0; co < s.Cout; ++co) {
        const uint16_t* wp = &d.w[(size_t)co * Kt];
        float acc = mode == RES_SEPARATE_NO_BIAS ? 0.f : d.bias[co];
        for (size_t k = 0; k < Kt; ++k) acc += xin[k] * bf2f(wp[k]);
        if (mode != RES_NONE) acc += bf2f(d.res[m * s.Cout + co]);
        ref[co] = acc;
    }
}

// Validates one kernel on one shape; pixel_step > 1 checks every pixel_step-th pixel plus the
// first and last rows of output pixels (NaN check on all).
static void check_conv(ConvData& d, bool fast, ResMode mode, size_t pixel_step) {
    const ConvShape& s = d.s;
    DBuf<uint16_t> dres(s.out_elems());
    d.dout.poison();
    if (mode != RES_NONE) dres.upload(d.res);
    const bool in_place = mode == RES_IN_PLACE;  // out == residual
    launch_conv(d, fast, mode != RES_NONE ? dres.d : nullptr, in_place ? dres.d : d.dout.d,
                mode == RES_SEPARATE_NO_BIAS);
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<uint16_t> h = in_place ? dres.download_all() : d.dout.download_all();
    Err e;
    e.guard = guard_intact(h, s.out_elems());
    for (size_t i = 0; i < s.out_elems(); ++i)
        if (!std::isfinite(bf2f(h[i]))) ++e.nonfinite;
    const size_t M = (size_t)s.N * s.Ho() * s.Wo();
    std::vector<size_t> pix;
    for (size_t m = 0; m < M; ++m)
        if (pixel_step <= 1 || m % pixel_step == 0 || m < (size_t)s.Wo() || m + s.Wo() >= M)
            pix.push_back(m);
    std::vector<double> perr(pix.size()), pref(pix.size());
    parallel_for(pix.size(), [&](size_t i) {
        std::vector<float> ref(s.Cout);
        conv_ref_pixel(d, mode, pix[i], ref.data());
        double me = 0, mr = 0;
        for (int co = 0; co < s.Cout; ++co) {
            const float g = bf2f(h[pix[i] * s.Cout + co]);
            me = std::max(me, (double)fabsf(g - ref[co]));
            if (!std::isfinite(g)) me = INFINITY;
            mr = std::max(mr, (double)fabsf(ref[co]));
        }
        perr[i] = me;
        pref[i] = mr;
    });
    for (size_t i = 0; i < pix.size(); ++i) {
        e.max_err = std::max(e.max_err, perr[i]);
        e.max_ref = std::max(e.max_ref, pref[i]);
    }
    char shape[96];
    s.str(shape, sizeof shape, mode);
    report(e.ok(kTol), fast ? "vae_conv2d_bf16" : "vae_conv2d_generic_bf16", shape, e);
}

// ------------------------------------------------------------------------------------------
// GroupNorm
// ------------------------------------------------------------------------------------------
struct GnPlan {
    int chunk, nchunks, apply_blocks;
};
static GnPlan gn_plan(int HW, int C) {
    GnPlan p;
    p.chunk = std::max(VAE_GN_MIN_CHUNK, (HW + VAE_GN_MAX_CHUNKS - 1) / VAE_GN_MAX_CHUNKS);
    p.nchunks = (HW + p.chunk - 1) / p.chunk;
    p.apply_blocks = VAE_GN_APPLY_BLOCKS(HW, C);
    return p;
}
static void launch_gn(const uint16_t* x, uint16_t* out, const float* gamma, const float* beta,
                      float* part, int N, int HW, int C, int silu) {
    const GnPlan p = gn_plan(HW, C);
    const bf16* xb = reinterpret_cast<const bf16*>(x);
    const float eps = 1e-6f;
    vae_groupnorm_stats_bf16<<<dim3(p.nchunks, N), VAE_GN_THREADS>>>(xb, part, N, HW, C, p.chunk, 0, eps);
    vae_groupnorm_stats_bf16<<<dim3(p.nchunks, N), VAE_GN_THREADS>>>(xb, part, N, HW, C, p.chunk, 1, eps);
    vae_groupnorm_stats_bf16<<<dim3(1, N), VAE_GN_THREADS>>>(xb, part, N, HW, C, p.chunk, 2, eps);
    vae_groupnorm_silu_bf16<<<dim3(p.apply_blocks, N), VAE_GN_THREADS>>>(
        xb, reinterpret_cast<bf16*>(out), gamma, beta, part + (size_t)2 * N * p.nchunks * 32, N, HW, C, silu);
    cudaCheck(cudaGetLastError());
}
struct GnData {
    int N, C, H, W;
    std::vector<uint16_t> x;
    std::vector<float> gamma, beta;
    DBuf<uint16_t> dx, dout;
    DBuf<float> dg, db, dpart;
    GnData(int N_, int C_, int H_, int W_, uint64_t seed)
        : N(N_), C(C_), H(H_), W(W_), dx((size_t)N_ * C_ * H_ * W_), dout((size_t)N_ * C_ * H_ * W_),
          dg(C_), db(C_), dpart((size_t)VAE_GN_PART_FLOATS(N_, gn_plan(H_ * W_, C_).nchunks)) {
        Rng r(seed);
        x.resize(dx.n);
        std::vector<float> off(C);
        for (auto& o : off) o = r.uniform(2.f, 6.f);  // large mean vs spread: cancellation test
        for (size_t i = 0; i < x.size(); ++i) x[i] = f2bf(off[i % C] + r.uniform(-1.f, 1.f));
        gamma.resize(C);
        beta.resize(C);
        for (auto& g : gamma) g = r.uniform(0.5f, 1.5f);
        for (auto& b : beta) b = r.uniform(-0.5f, 0.5f);
        dx.upload(x);
        dg.upload(gamma);
        db.upload(beta);
    }
};
static void check_gn(GnData& d, int silu) {
    const int HW = d.H * d.W, cpg = d.C / 32;
    d.dout.poison();
    d.dpart.poison();
    launch_gn(d.dx.d, d.dout.d, d.dg.d, d.db.d, d.dpart.d, d.N, HW, d.C, silu);
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<uint16_t> h = d.dout.download_all();
    Err e;
    e.guard = guard_intact(h, d.dout.n);
    std::vector<double> mean(d.N * 32), rstd(d.N * 32);
    parallel_for((size_t)d.N * 32, [&](size_t ng) {
        const int n = (int)(ng / 32), g = (int)(ng % 32);
        double s = 0, q = 0;
        for (int p = 0; p < HW; ++p)
            for (int c = g * cpg; c < (g + 1) * cpg; ++c) s += bf2f(d.x[((size_t)n * HW + p) * d.C + c]);
        const double cnt = (double)HW * cpg, mu = s / cnt;
        for (int p = 0; p < HW; ++p)
            for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
                const double v = bf2f(d.x[((size_t)n * HW + p) * d.C + c]) - mu;
                q += v * v;
            }
        mean[ng] = mu;
        rstd[ng] = 1.0 / sqrt(q / cnt + 1e-6);
    });
    for (size_t i = 0; i < d.dout.n; ++i) {
        const int c = (int)(i % d.C);
        const int n = (int)(i / ((size_t)HW * d.C));
        const int g = c / cpg;
        double y = (bf2f(d.x[i]) - mean[n * 32 + g]) * rstd[n * 32 + g] * d.gamma[c] + d.beta[c];
        if (silu) y = y / (1.0 + exp(-y));
        const float gv = bf2f(h[i]);
        if (!std::isfinite(gv)) ++e.nonfinite;
        e.max_err = std::max(e.max_err, fabs(gv - y));
        e.max_ref = std::max(e.max_ref, fabs(y));
    }
    char shape[96];
    snprintf(shape, sizeof shape, "N=%d C=%d %dx%d%s", d.N, d.C, d.H, d.W, silu ? " +silu" : "");
    report(e.ok(kTol), "vae_groupnorm(_silu)_bf16", shape, e);
}

// ------------------------------------------------------------------------------------------
// Upsample and layout
// ------------------------------------------------------------------------------------------
static void check_upsample(int N, int H, int W, int C) {
    DBuf<uint16_t> dx((size_t)N * H * W * C), dout((size_t)N * 4 * H * W * C);
    const std::vector<uint16_t> x = rand_bf16(dx.n, -3.f, 3.f, 77);
    dx.upload(x);
    dout.poison();
    const size_t vec = dout.n / 8;
    vae_upsample2x_nearest_bf16<<<(unsigned)((vec + 255) / 256), VAE_ELEMWISE_THREADS>>>(
        reinterpret_cast<const bf16*>(dx.d), reinterpret_cast<bf16*>(dout.d), N, H, W, C);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<uint16_t> h = dout.download_all();
    Err e;
    e.guard = guard_intact(h, dout.n);
    size_t mism = 0;
    for (int n = 0; n < N; ++n)
        for (int y = 0; y < 2 * H; ++y)
            for (int xx = 0; xx < 2 * W; ++xx)
                for (int c = 0; c < C; ++c) {
                    const uint16_t g = h[(((size_t)n * 2 * H + y) * 2 * W + xx) * C + c];
                    const uint16_t r = x[(((size_t)n * H + y / 2) * W + xx / 2) * C + c];
                    if (!std::isfinite(bf2f(g))) ++e.nonfinite;
                    if (g != r) ++mism;
                    e.max_ref = std::max(e.max_ref, (double)fabsf(bf2f(r)));
                    e.max_err = std::max(e.max_err, (double)fabsf(bf2f(g) - bf2f(r)));
                }
    char shape[96];
    snprintf(shape, sizeof shape, "N=%d %dx%d C=%d (exact)", N, H, W, C);
    report(e.ok(0) && mism == 0, "vae_upsample2x_nearest_bf16", shape, e);
}
static void check_layout(int N, int C, int H, int W) {
    const size_t n = (size_t)N * C * H * W;
    const int HW = H * W;
    DBuf<float> din(n), dback(n);
    DBuf<uint16_t> dmid(n);
    Rng r(99);
    std::vector<float> in(n);
    for (auto& v : in) v = r.uniform(-2.f, 2.f);
    din.upload(in);
    dmid.poison();
    dback.poison();
    const unsigned grid = (unsigned)((n + 255) / 256);
    nchw_f32_to_nhwc_bf16<<<grid, VAE_ELEMWISE_THREADS>>>(din.d, reinterpret_cast<bf16*>(dmid.d), N, C, HW);
    nhwc_bf16_to_nchw_f32<<<grid, VAE_ELEMWISE_THREADS>>>(reinterpret_cast<const bf16*>(dmid.d), dback.d, N, C, HW);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaDeviceSynchronize());
    const std::vector<uint16_t> mid = dmid.download_all();
    const std::vector<float> back = dback.download_all();
    Err e1, e2;
    e1.guard = guard_intact(mid, n);
    e2.guard = guard_intact(back, n);
    size_t bad1 = 0, bad2 = 0;
    for (int b = 0; b < N; ++b)
        for (int c = 0; c < C; ++c)
            for (int p = 0; p < HW; ++p) {
                const size_t src = ((size_t)b * C + c) * HW + p;
                const uint16_t want = f2bf(in[src]);
                const uint16_t got = mid[((size_t)b * HW + p) * C + c];
                if (got != want) ++bad1;
                if (back[src] != bf2f(want)) ++bad2;  // exact: bf16 -> f32 is lossless
                if (!std::isfinite(back[src])) ++e2.nonfinite;
                e1.max_ref = e2.max_ref = std::max(e1.max_ref, (double)fabsf(in[src]));
                e2.max_err = std::max(e2.max_err, (double)fabsf(back[src] - in[src]));
            }
    char shape[96];
    snprintf(shape, sizeof shape, "N=%d C=%d %dx%d (exact)", N, C, H, W);
    report(bad1 == 0 && e1.guard, "nchw_f32_to_nhwc_bf16", shape, e1);
    report(bad2 == 0 && e2.guard && e2.nonfinite == 0, "nhwc_bf16_to_nchw_f32", shape, e2);
}

// cuBLAS ceiling: cublas_ceiling_tflops() in check_common.cuh

// ------------------------------------------------------------------------------------------
// Timing: CUDA events around each launch, L2 flushed (memset of 2x L2) before each one
// ------------------------------------------------------------------------------------------
template <class F>
static double time_ms(F launch, void* flush, size_t flush_bytes, int iters) {
    for (int i = 0; i < 2; ++i) launch();
    cudaCheck(cudaDeviceSynchronize());
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    double total = 0;
    for (int i = 0; i < iters; ++i) {
        cudaCheck(cudaMemsetAsync(flush, i & 0xff, flush_bytes));
        cudaCheck(cudaEventRecord(e0));
        launch();
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        float ms = 0;
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        total += ms;
    }
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaEventDestroy(e0));
    cudaCheck(cudaEventDestroy(e1));
    return total / iters;
}

static void print_attrs(const char* name, const void* fn, int threads, int smem) {
    cudaFuncAttributes a;
    cudaCheck(cudaFuncGetAttributes(&a, fn));
    int blocks = 0;
    cudaCheck(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, threads, smem));
    printf("  %-28s regs=%d local=%zuB static_smem=%zuB ctas/SM=%d\n", name, a.numRegs,
           (size_t)a.localSizeBytes, (size_t)a.sharedSizeBytes, blocks);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    int dev = 0;
    cudaCheck(cudaSetDevice(dev));
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, dev));
    printf("device: %s (sm_%d%d, %d SMs, L2 %d MiB)\n", prop.name, prop.major, prop.minor,
           prop.multiProcessorCount, prop.l2CacheSize >> 20);
    print_attrs("vae_conv2d_bf16", (const void*)vae_conv2d_bf16, VAE_CONV_THREADS, VAE_CONV_SMEM_BYTES);
    print_attrs("vae_conv2d_generic_bf16", (const void*)vae_conv2d_generic_bf16, 256, 0);
    print_attrs("vae_groupnorm_stats_bf16", (const void*)vae_groupnorm_stats_bf16, 256, 0);
    print_attrs("vae_groupnorm_silu_bf16", (const void*)vae_groupnorm_silu_bf16, 256, 0);
    print_attrs("vae_upsample2x_nearest_bf16", (const void*)vae_upsample2x_nearest_bf16, 256, 0);

    // ---- validation ----
    struct CC {
        ConvShape s;
        bool generic_too;
    };
    const std::vector<CC> convs = {
        {conv3(1, 32, 32, 16, 16), true},    {conv3(2, 64, 128, 33, 17), true},
        {conv3(1, 128, 128, 64, 64), true},  {down(1, 64, 64, 32, 32), true},
        {down(1, 32, 64, 33, 19), true},     {conv1(1, 128, 256, 32, 32), true},
        {conv3(1, 3, 32, 32, 32), true},     {conv3(1, 32, 3, 24, 24), true},
        {conv3(1, 128, 32, 24, 24), true},   {conv3(1, 64, 40, 20, 12), true},
        {conv3(1, 16, 64, 16, 16), true},    {up3(1, 64, 64, 16, 16), true},
        {up3(2, 32, 96, 9, 7), true},        {conv1(2, 96, 200, 7, 5), true},
    };
    uint64_t seed = 1000;
    for (const CC& c : convs) {
        ConvData d(c.s, seed += 10);
        for (int res = 0; res < 3; ++res) {
            if (c.s.fast_ok()) check_conv(d, true, (ResMode)res, 1);
            if (c.generic_too || !c.s.fast_ok()) check_conv(d, false, (ResMode)res, 1);
        }
    }
    {
        GnData a(1, 64, 32, 32, 1), b(2, 128, 17, 9, 2), c(1, 512, 128, 128, 3), e(1, 32, 5, 3, 4);
        for (int silu = 0; silu < 2; ++silu) {
            check_gn(a, silu);
            check_gn(b, silu);
            check_gn(c, silu);
            check_gn(e, silu);
        }
    }
    check_upsample(1, 16, 16, 64);
    check_upsample(2, 9, 7, 32);
    check_layout(1, 3, 32, 32);
    check_layout(2, 16, 17, 9);

    // ---- benchmark shapes (validated on sampled pixels, then timed) ----
    if (!quick) {
        const size_t flush_bytes = (size_t)2 * (prop.l2CacheSize > 0 ? prop.l2CacheSize : (64 << 20));
        void* flush = nullptr;
        cudaCheck(cudaMalloc(&flush, flush_bytes));
        const double ceiling_meas = cublas_ceiling_tflops();
        const double ceiling = ceiling_meas > 0 ? ceiling_meas : 798.0;
        printf("\nbenchmark (CUDA events, L2 flushed, mean of 10). ceiling: %.0f TFLOP/s (%s)\n", ceiling,
               ceiling_meas > 0 ? "cuBLAS bf16 GEMM 8192^3, measured" : "H100 figure, cuBLAS not found");
        struct BC {
            ConvShape s;
            bool res;
        };
        const std::vector<BC> bconvs = {
            {conv3(1, 512, 512, 128, 128), false}, {conv3(1, 512, 512, 128, 128), true},
            {conv3(1, 256, 256, 256, 256), false}, {conv3(1, 128, 128, 512, 512), false},
            {up3(1, 512, 512, 128, 128), false},   {down(1, 128, 128, 512, 512), false},
            {conv1(1, 256, 128, 512, 512), false}, {conv3(1, 16, 512, 128, 128), false},
            {conv3(1, 128, 3, 512, 512), false},
        };
        for (const BC& b : bconvs) {
            ConvData d(b.s, seed += 10);
            const bool fast = b.s.fast_ok();
            const size_t M = (size_t)b.s.N * b.s.Ho() * b.s.Wo();
            check_conv(d, fast, b.res ? RES_IN_PLACE : RES_NONE, std::max<size_t>(1, M / 400) | 1);
            DBuf<uint16_t> dres(b.s.out_elems());
            dres.upload(d.res);
            // The residual case runs in place (out == residual), as validated.
            const double ms = time_ms([&] { launch_conv(d, fast, b.res ? dres.d : nullptr, b.res ? dres.d : d.dout.d); },
                                      flush, flush_bytes, 10);
            const double tf = b.s.flops() / (ms * 1e-3) / 1e12;
            char shape[96];
            b.s.str(shape, sizeof shape, b.res ? RES_IN_PLACE : RES_NONE);
            printf("  TIME %-24s %-36s %8.3f ms %7.1f TFLOP/s (%4.1f%% of ceiling)\n",
                   fast ? "vae_conv2d_bf16" : "vae_conv2d_generic_bf16", shape, ms, tf, 100.0 * tf / ceiling);
        }
        // GroupNorm bandwidth vs a device copy of the same bytes.
        struct BG {
            int C, H, W;
        };
        const std::vector<BG> bgns = {{512, 128, 128}, {256, 256, 256}, {128, 512, 512}, {128, 1024, 1024}};
        for (const BG& g : bgns) {
            GnData d(1, g.C, g.H, g.W, 500 + g.C);
            check_gn(d, 1);
            const int HW = g.H * g.W;
            const size_t bytes = d.dx.n * 2;
            const double ms = time_ms([&] { launch_gn(d.dx.d, d.dout.d, d.dg.d, d.db.d, d.dpart.d, 1, HW, g.C, 1); },
                                      flush, flush_bytes, 10);
            const double cms = time_ms([&] { cudaCheck(cudaMemcpyAsync(d.dout.d, d.dx.d, bytes, cudaMemcpyDeviceToDevice)); },
                                       flush, flush_bytes, 10);
            printf("  TIME %-24s C=%-4d %4dx%-4d +silu %8.3f ms %7.0f GB/s (copy %.3f ms, %.0f GB/s)\n",
                   "groupnorm_silu (4 launches)", g.C, g.H, g.W, ms, 2.0 * bytes / (ms * 1e-3) / 1e9, cms,
                   2.0 * bytes / (cms * 1e-3) / 1e9);
        }
        cudaCheck(cudaFree(flush));
    }
    printf("\n%s: %d failing case(s)\n", g_failures ? "FAIL" : "PASS", g_failures);
    return g_failures ? 1 : 0;
}
