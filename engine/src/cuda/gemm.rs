//! cuBLASLt GEMMs: bf16 inputs and outputs (f32 output for the unfused attention's scores),
//! f32 accumulation, optional bias (and GELU) epilogue, strided batches. Descriptors are RAII (`Drop`); one plan (descriptors and the
//! heuristic's algorithm) is cached per shape, so a sampling loop only looks plans up.
//!
//! GELU epilogue: the cuBLASLt documentation does not spell out its GELU formula (llm.c uses
//! `CUBLASLT_EPILOGUE_GELU_BIAS` for GPT-2's tanh GELU). On the H100 the MMDiT with the fused
//! epilogue matched the CPU reference (tanh-GELU), so the MMDiT uses it by default
//! (`Options::gelu_epilogue`); `DPIR_GELU_EPILOGUE=0` switches to a bias GEMM followed by the
//! tanh-GELU kernel, and `engine/tests/cuda_kernels.rs` compares the epilogue with tanh-GELU
//! and erf-GELU elementwise.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys};

use super::device::{derr, Bf16, CudaDevice, DView, DeviceBuffer};
use crate::error::{Error, Result};

const WORKSPACE_BYTES: usize = 32 << 20;

/// The epilogue applied to `D = A·B (+ bias)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    None,
    Bias,
    GeluBias,
}

/// A column-major GEMM description: `D[m×n] = op(A)[m×k] · op(B)[k×n] (+ bias[m])`,
/// `batch` matrices at the given element strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    ta: bool,
    tb: bool,
    m: u64,
    n: u64,
    k: u64,
    lda: i64,
    ldb: i64,
    ldd: i64,
    batch: i32,
    sa: i64,
    sb: i64,
    sd: i64,
    epi: Epilogue,
    /// D (and C) in f32 instead of bf16 (A and B stay bf16; compute and scale f32).
    d_f32: bool,
}

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

struct Handle(sys::cublasLtHandle_t);
impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by create_handle, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}
// SAFETY: the handle is only used under the `Gemm` methods, which serialise plan creation
// through a mutex; cuBLASLt handles may be used from any thread.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

struct Plan {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}
// SAFETY: descriptors are plain host-side objects, never mutated concurrently (mutex).
unsafe impl Send for Plan {}

fn lterr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("cuBLASLt {what}: {e:?}"))
}

fn layout(
    dtype: sys::cudaDataType,
    rows: u64,
    cols: u64,
    ld: i64,
    batch: i32,
    stride: i64,
) -> Result<Layout> {
    let l = Layout(
        lt::create_matrix_layout(dtype, rows, cols, ld).map_err(|e| lterr("matrix layout", e))?,
    );
    if batch > 1 {
        // SAFETY: l.0 is a live layout; the attribute buffers match their declared types
        // (int32 batch count, int64 stride).
        unsafe {
            lt::set_matrix_layout_attribute(
                l.0,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &batch as *const i32 as *const c_void,
                4,
            )
            .map_err(|e| lterr("batch count", e))?;
            lt::set_matrix_layout_attribute(
                l.0,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &stride as *const i64 as *const c_void,
                8,
            )
            .map_err(|e| lterr("batch stride", e))?;
        }
    }
    Ok(l)
}

/// The cuBLASLt handle, its workspace and the plan cache.
pub struct Gemm {
    handle: Handle,
    workspace: DeviceBuffer,
    plans: Mutex<HashMap<Shape, Plan>>,
    dev: Arc<DevRef>,
    ctx: Arc<cudarc::driver::CudaContext>,
}

/// What the GEMM needs from the device (the stream).
struct DevRef {
    stream: sys::cudaStream_t,
}
// SAFETY: a CUstream handle is usable from any thread.
unsafe impl Send for DevRef {}
unsafe impl Sync for DevRef {}

impl Gemm {
    /// Creates the handle and a 32 MiB workspace (one counted allocation). Errors cleanly
    /// when libcublasLt cannot be loaded.
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        if !super::cublaslt_present() {
            return Err(Error::Cuda(
                "libcublasLt not found (put the CUDA 13 libraries on LD_LIBRARY_PATH)".into(),
            ));
        }
        dev.ctx
            .bind_to_thread()
            .map_err(|e| derr("binding the context", e))?;
        let handle = Handle(lt::create_handle().map_err(|e| lterr("create handle", e))?);
        let workspace = dev.alloc(WORKSPACE_BYTES)?;
        Ok(Self {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            dev: Arc::new(DevRef {
                stream: dev.cu_stream() as sys::cudaStream_t,
            }),
            ctx: dev.ctx.clone(),
        })
    }

    fn plan(&self, s: &Shape) -> Result<Plan> {
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(|e| lterr("matmul desc", e))?,
        );
        let op = |t: bool| {
            if t {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (ta, tb) = (op(s.ta), op(s.tb));
        let epi = match s.epi {
            Epilogue::None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::GeluBias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
        };
        let bias_type = sys::cudaDataType::CUDA_R_16BF;
        // SAFETY: desc.0 is live; each buffer has the size and type cuBLASLt documents for
        // the attribute (cublasOperation_t, cublasLtEpilogue_t, cudaDataType).
        unsafe {
            use sys::cublasLtMatmulDescAttributes_t as A;
            let set = |attr: A, p: *const c_void, n: usize| {
                lt::set_matmul_desc_attribute(desc.0, attr, p, n)
                    .map_err(|e| lterr("desc attribute", e))
            };
            set(
                A::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const _ as *const c_void,
                std::mem::size_of_val(&ta),
            )?;
            set(
                A::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb as *const _ as *const c_void,
                std::mem::size_of_val(&tb),
            )?;
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epi as *const _ as *const c_void,
                std::mem::size_of_val(&epi),
            )?;
            if s.epi != Epilogue::None {
                set(
                    A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &bias_type as *const _ as *const c_void,
                    std::mem::size_of_val(&bias_type),
                )?;
            }
        }
        let (ar, ac) = if s.ta { (s.k, s.m) } else { (s.m, s.k) };
        let (br, bc) = if s.tb { (s.n, s.k) } else { (s.k, s.n) };
        let bf = sys::cudaDataType::CUDA_R_16BF;
        let dt = if s.d_f32 {
            sys::cudaDataType::CUDA_R_32F
        } else {
            bf
        };
        let a = layout(bf, ar, ac, s.lda, s.batch, s.sa)?;
        let b = layout(bf, br, bc, s.ldb, s.batch, s.sb)?;
        let d = layout(dt, s.m, s.n, s.ldd, s.batch, s.sd)?;
        let pref = Pref(lt::create_matmul_pref().map_err(|e| lterr("preference", e))?);
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: pref.0 is live; the attribute is a u64 byte count.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(|e| lterr("workspace preference", e))?;
            // Batched operands start at element strides that need not be 256-byte aligned
            // (the default the heuristic assumes): ask for algorithms that need only 16.
            if s.batch > 1 {
                use sys::cublasLtMatmulPreferenceAttributes_t as P;
                let align = 16u32;
                for attr in [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    lt::set_matmul_pref_attribute(
                        pref.0,
                        attr,
                        &align as *const u32 as *const c_void,
                        4,
                    )
                    .map_err(|e| lterr("alignment preference", e))?;
                }
            }
        }
        // SAFETY: all descriptors are live and describe the same problem.
        let heur = unsafe {
            lt::get_matmul_algo_heuristic(self.handle.0, desc.0, a.0, b.0, d.0, d.0, pref.0)
        }
        .map_err(|e| lterr(&format!("no algorithm for {s:?}"), e))?;
        Ok(Plan {
            desc,
            a,
            b,
            d,
            algo: heur.algo,
        })
    }

    /// Column-major GEMM on raw pointers.
    ///
    /// # Safety
    /// `a`, `b`, `d` (and `bias` when the epilogue reads it) must point to live device memory
    /// holding the matrices `s` describes (all batches); `d` must not alias `a` or `b`.
    unsafe fn run(
        &self,
        s: Shape,
        a: u64,
        b: u64,
        d: u64,
        bias: u64,
        accumulate: bool,
    ) -> Result<()> {
        if s.m == 0 || s.n == 0 || s.batch == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| derr("binding the context", e))?;
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| Error::Cuda("GEMM plan cache poisoned".into()))?;
        let plan = match plans.entry(s) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(self.plan(&s)?),
        };
        if s.epi != Epilogue::None {
            let bp = bias as *const c_void;
            lt::set_matmul_desc_attribute(
                plan.desc.0,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bp as *const *const c_void as *const c_void,
                std::mem::size_of::<*const c_void>(),
            )
            .map_err(|e| lterr("bias pointer", e))?;
        }
        let alpha = 1f32;
        let beta = if accumulate { 1f32 } else { 0f32 };
        lt::matmul(
            self.handle.0,
            plan.desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a as *const c_void,
            plan.a.0,
            b as *const c_void,
            plan.b.0,
            d as *const c_void,
            plan.d.0,
            d as *mut c_void,
            plan.d.0,
            &plan.algo,
            self.workspace.ptr() as *mut c_void,
            WORKSPACE_BYTES,
            self.dev.stream,
        )
        .map_err(|e| lterr(&format!("matmul {s:?}"), e))
    }

    /// Row-major Linear: `y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n])` (PyTorch weight layout),
    /// with an optional GELU(tanh) epilogue. `accumulate` adds into `y` (no bias then).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: DView<Bf16>,
        w: DView<Bf16>,
        bias: Option<DView<Bf16>>,
        y: DView<Bf16>,
        m: usize,
        k: usize,
        n: usize,
        gelu: bool,
    ) -> Result<()> {
        x.need(m * k, "linear x")?;
        w.need(n * k, "linear w")?;
        y.need(m * n, "linear y")?;
        let epi = match (bias, gelu) {
            (Some(b), g) => {
                b.need(n, "linear bias")?;
                if g {
                    Epilogue::GeluBias
                } else {
                    Epilogue::Bias
                }
            }
            (None, false) => Epilogue::None,
            (None, true) => return Err(Error::Cuda("GELU epilogue needs a bias".into())),
        };
        let s = Shape {
            ta: true,
            tb: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            lda: k as i64,
            ldb: k as i64,
            ldd: n as i64,
            batch: 1,
            sa: 0,
            sb: 0,
            sd: 0,
            epi,
            d_f32: false,
        };
        // SAFETY: lengths checked above; y is a separate buffer from x and w by construction
        // of the callers (activations vs weights).
        unsafe { self.run(s, w.ptr, x.ptr, y.ptr, bias.map_or(0, |b| b.ptr), false) }
    }

    /// Batched row-major `s[i] = q[i] · k[i]ᵀ` with q `[lq, d]`, k `[lk, d]`, s `[lq, lk]`
    /// (bf16 scores).
    #[allow(clippy::too_many_arguments)]
    pub fn batched_qkt(
        &self,
        q: DView<Bf16>,
        k: DView<Bf16>,
        s: DView<Bf16>,
        batch: usize,
        lq: usize,
        lk: usize,
        d: usize,
    ) -> Result<()> {
        s.need(batch * lq * lk, "qkt s")?;
        self.qkt(q, k, s.ptr, false, batch, lq, lk, d)
    }

    /// [`Gemm::batched_qkt`] with f32 scores (bf16 inputs, f32 accumulation and output): the
    /// unfused attention's logits keep f32 precision into the softmax.
    #[allow(clippy::too_many_arguments)]
    pub fn batched_qkt_f32(
        &self,
        q: DView<Bf16>,
        k: DView<Bf16>,
        s: DView<f32>,
        batch: usize,
        lq: usize,
        lk: usize,
        d: usize,
    ) -> Result<()> {
        s.need(batch * lq * lk, "qkt s")?;
        self.qkt(q, k, s.ptr, true, batch, lq, lk, d)
    }

    /// `s` holds `batch · lq · lk` elements of f32 (`s_f32`) or bf16 (checked by the callers).
    #[allow(clippy::too_many_arguments)]
    fn qkt(
        &self,
        q: DView<Bf16>,
        k: DView<Bf16>,
        s: u64,
        s_f32: bool,
        batch: usize,
        lq: usize,
        lk: usize,
        d: usize,
    ) -> Result<()> {
        q.need(batch * lq * d, "qkt q")?;
        k.need(batch * lk * d, "qkt k")?;
        let sh = Shape {
            ta: true,
            tb: false,
            m: lk as u64,
            n: lq as u64,
            k: d as u64,
            lda: d as i64,
            ldb: d as i64,
            ldd: lk as i64,
            batch: i32::try_from(batch)
                .map_err(|_| Error::Cuda(format!("qkt: batch {batch} too large")))?,
            sa: (lk * d) as i64,
            sb: (lq * d) as i64,
            sd: (lq * lk) as i64,
            epi: Epilogue::None,
            d_f32: s_f32,
        };
        // SAFETY: q and k checked above, s by the callers (batch · lq · lk elements of the
        // declared type) for all batches; s is a separate scratch buffer.
        unsafe { self.run(sh, k.ptr, q.ptr, s, 0, false) }
    }

    /// Batched row-major `o[i] = p[i] · v[i]` with p `[lq, lk]`, v `[lk, d]`, o `[lq, d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn batched_pv(
        &self,
        p: DView<Bf16>,
        v: DView<Bf16>,
        o: DView<Bf16>,
        batch: usize,
        lq: usize,
        lk: usize,
        d: usize,
    ) -> Result<()> {
        p.need(batch * lq * lk, "pv p")?;
        v.need(batch * lk * d, "pv v")?;
        o.need(batch * lq * d, "pv o")?;
        let sh = Shape {
            ta: false,
            tb: false,
            m: d as u64,
            n: lq as u64,
            k: lk as u64,
            lda: d as i64,
            ldb: lk as i64,
            ldd: d as i64,
            batch: i32::try_from(batch)
                .map_err(|_| Error::Cuda(format!("pv: batch {batch} too large")))?,
            sa: (lk * d) as i64,
            sb: (lq * lk) as i64,
            sd: (lq * d) as i64,
            epi: Epilogue::None,
            d_f32: false,
        };
        // SAFETY: lengths checked above for all batches; o is a separate buffer.
        unsafe { self.run(sh, v.ptr, p.ptr, o.ptr, 0, false) }
    }

    /// Plans cached so far.
    pub fn cached_plans(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
    }
}
