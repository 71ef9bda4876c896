//! Device, context, stream, embedded modules, raw device buffers and the typed views the
//! launch layer takes.
//!
//! Memory model: every allocation goes through [`CudaDevice::alloc`], which counts it
//! ([`CudaDevice::allocations`]); the weights take one buffer, each forward plan one arena,
//! and views ([`DView`]) are carved out of those up front. Kernels receive raw device
//! pointers, checked against the view lengths by the launchers in [`super::ops`].

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::{result as dres, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use dpir_kernels::{Image, KernelModule};

use crate::error::{Error, Result};

pub(crate) fn derr(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// A failed `cuMemAlloc`: out of memory is its own error (callers retry with smaller tiles).
fn alloc_error(bytes: usize, e: cudarc::driver::DriverError) -> Error {
    use cudarc::driver::sys::CUresult;
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("allocating {bytes} bytes"))
    } else {
        derr(&format!("allocating {bytes} bytes"), e)
    }
}

/// bf16 element marker (stored as its 16-bit pattern).
#[derive(Clone, Copy, Debug)]
pub struct Bf16;

/// Element types a view can hold.
pub trait Elem: Copy {
    const BYTES: usize;
}
impl Elem for Bf16 {
    const BYTES: usize = 2;
}
impl Elem for f32 {
    const BYTES: usize = 4;
}
impl Elem for i32 {
    const BYTES: usize = 4;
}

/// A typed window of device memory: a raw pointer and an element count. Copyable and
/// lifetime-free, so buffers can be planned once; the owner of the memory
/// ([`DeviceBuffer`]) must outlive every launch that uses a view (the plan and the weights
/// hold their buffers for as long as they hand out views).
#[derive(Clone, Copy, Debug)]
pub struct DView<T> {
    pub ptr: u64,
    pub len: usize,
    _t: PhantomData<T>,
}

impl<T: Elem> DView<T> {
    /// A view from a raw pointer. Only the allocation code makes these.
    pub(crate) fn raw(ptr: u64, len: usize) -> Self {
        Self {
            ptr,
            len,
            _t: PhantomData,
        }
    }

    /// Elements `[start, start + len)`; errors when out of range.
    pub fn sub(&self, start: usize, len: usize) -> Result<Self> {
        if start.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::Cuda(format!(
                "view [{start}, +{len}) out of range of {} elements",
                self.len
            )));
        }
        Ok(Self::raw(self.ptr + (start * T::BYTES) as u64, len))
    }

    pub fn bytes(&self) -> usize {
        self.len * T::BYTES
    }

    /// Checks that the view holds at least `n` elements (`what` names it in the error).
    pub fn need(&self, n: usize, what: &str) -> Result<()> {
        if self.len < n {
            return Err(Error::Cuda(format!(
                "{what}: needs {n} elements, view has {}",
                self.len
            )));
        }
        Ok(())
    }
}

/// One device allocation, freed on drop.
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The whole buffer as elements of `T`.
    pub fn view<T: Elem>(&self) -> DView<T> {
        DView::raw(self.ptr, self.bytes / T::BYTES)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `ptr` came from `malloc_sync` in `CudaDevice::alloc` and is freed once.
            // Free synchronises with the device, so no launch still uses it.
            let _ = unsafe { dres::free_sync(self.ptr) };
        }
    }
}

/// A bump allocator over one [`DeviceBuffer`]: carve views up front, never inside a loop.
pub struct Arena {
    pub buffer: DeviceBuffer,
    used: usize,
}

/// Alignment of every carved view (bytes): 16-byte vector accesses and cuBLASLt's 256.
pub const ARENA_ALIGN: usize = 256;

/// Bytes a view of `n` elements takes in an arena, aligned.
pub fn arena_bytes<T: Elem>(n: usize) -> usize {
    (n * T::BYTES).div_ceil(ARENA_ALIGN) * ARENA_ALIGN
}

impl Arena {
    pub fn new(buffer: DeviceBuffer) -> Self {
        Self { buffer, used: 0 }
    }
    pub fn carve<T: Elem>(&mut self, n: usize) -> Result<DView<T>> {
        let need = arena_bytes::<T>(n);
        if self.used + need > self.buffer.bytes {
            return Err(Error::Cuda(format!(
                "arena exhausted: {} + {need} > {} bytes (plan too small)",
                self.used, self.buffer.bytes
            )));
        }
        let v = DView::raw(self.buffer.ptr + self.used as u64, n);
        self.used += need;
        Ok(v)
    }
    pub fn used(&self) -> usize {
        self.used
    }
}

/// f32 values as bf16 bit patterns (round to nearest even), for `CudaDevice::upload_bf16`.
pub fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

/// The device, its context and one stream, plus every kernel function resolved up front.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub cc: (i32, i32),
    funcs: HashMap<&'static str, CudaFunction>,
    /// How each module was loaded ("cubin sm_90a", "ptx", "nvrtc"), or why it was not.
    pub module_report: Vec<(KernelModule, String)>,
    allocs: AtomicUsize,
    bytes: AtomicUsize,
    _modules: Vec<Arc<CudaModule>>,
}

/// Kernel names per module, resolved when the device is created.
const FUNCTIONS: &[(KernelModule, &[&str])] = &[
    (
        KernelModule::Norm,
        &[
            "adaln_modulate_bf16",
            "gated_residual_bf16",
            "rmsnorm_qk_bf16",
            "channel_stats_bf16",
            "align_add_bf16",
            "layernorm_affine_bf16",
        ],
    ),
    (
        KernelModule::Act,
        &[
            "gelu_tanh_bf16",
            "silu_bf16",
            "quick_gelu_bf16",
            "add_bf16",
            "f32_to_bf16",
            "bf16_to_f32",
            "timestep_embedding_bf16",
            "softmax_rows_bf16",
            "softmax_rows_f32_bf16",
        ],
    ),
    (
        KernelModule::Layout,
        &[
            "patchify_f32_bf16",
            "pos_embed_add_bf16",
            "unpatchify_bf16_f32",
            "cfg_euler_f32",
            "cfg_euler_dsig_f32",
            "schedule_step_f32",
            "cfg_combine_f32",
            "split_heads_bf16",
            "merge_heads_bf16",
        ],
    ),
    (
        KernelModule::Vae,
        &[
            "group_norm_silu_bf16",
            "upsample_nearest2x_bf16",
            "im2col3x3_bf16",
        ],
    ),
    (
        KernelModule::Attention,
        &[
            "joint_attn_hd64_bf16",
            "joint_attn_hd64_bf16_qknorm",
            "joint_attn_hd64_w4_bf16",
            "joint_attn_hd64_w4_bf16_qknorm",
            // sm_90a only (absent from the sm_80 cubin).
            "joint_attn_hd64_wgmma_bf16",
            "joint_attn_hd64_wgmma_bf16_qknorm",
            "joint_attn_hd64_wgmma_poly_bf16",
            "joint_attn_hd64_wgmma_poly_bf16_qknorm",
        ],
    ),
    (
        KernelModule::VaeConv,
        &["vae_conv2d_bf16", "vae_conv2d_generic_bf16"],
    ),
    (
        KernelModule::VaeNorm,
        &[
            "vae_groupnorm_stats_bf16",
            "vae_groupnorm_silu_bf16",
            "vae_upsample2x_nearest_bf16",
            "nchw_f32_to_nhwc_bf16",
            "nhwc_bf16_to_nchw_f32",
        ],
    ),
];

impl CudaDevice {
    /// Opens device `ordinal`: checks that the driver library exists before any driver call
    /// (cudarc panics otherwise), creates the context and a stream, and loads every
    /// embedded kernel module (cubin for the device, else PTX, else NVRTC from source).
    /// The attention module may be missing (then the unfused fallback runs); the others
    /// are required.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !super::driver_present() {
            return Err(Error::NoCuda);
        }
        let count = CudaContext::device_count().map_err(|e| derr("cuDeviceGetCount", e))?;
        if count <= 0 {
            return Err(Error::Cuda("the CUDA driver reports no device".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::Cuda(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| derr("creating the context", e))?;
        // SAFETY: one stream and raw pointers: cudarc's cross-stream event tracking is not
        // used by this backend (all work is ordered on `stream`).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| derr("creating a stream", e))?;
        let name = ctx.name().map_err(|e| derr("device name", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| derr("compute capability", e))?;
        let mut funcs = HashMap::new();
        let mut modules = Vec::new();
        let mut report = Vec::new();
        for &(module, names) in FUNCTIONS {
            match load_module(&ctx, module, cc) {
                Ok((m, how)) => {
                    let mut missing = Vec::new();
                    for &f in names {
                        match m.load_function(f) {
                            Ok(func) => {
                                funcs.insert(f, func);
                            }
                            Err(_) => missing.push(f),
                        }
                    }
                    if !missing.is_empty() && module != KernelModule::Attention {
                        return Err(Error::Cuda(format!(
                            "module {}: missing kernels {missing:?}",
                            module.name()
                        )));
                    }
                    report.push((module, how));
                    modules.push(m);
                }
                Err(e) if module == KernelModule::Attention => {
                    report.push((module, format!("not loaded ({e}); unfused fallback")));
                }
                // No embedded image for this device and no NVRTC fallback (the NHWC VAE
                // kernels include <cuda_bf16.h>): the device still opens; loading the CUDA
                // VAE then fails with a clean error.
                Err(e) if matches!(module, KernelModule::VaeConv | KernelModule::VaeNorm) => {
                    report.push((module, format!("not loaded ({e}); no CUDA VAE")));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Self {
            ctx,
            stream,
            name,
            cc,
            funcs,
            module_report: report,
            allocs: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            _modules: modules,
        })
    }

    /// A kernel function by name (resolved when the device was opened).
    pub fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| Error::Cuda(format!("kernel `{name}` is not loaded")))
    }

    pub fn has_func(&self, name: &str) -> bool {
        self.funcs.contains_key(name)
    }

    /// Allocates `bytes` of device memory (counted). Not for use inside a sampling loop.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| derr("binding the context", e))?;
        let bytes = bytes.max(ARENA_ALIGN);
        // SAFETY: plain cuMemAlloc of `bytes` in the bound context; freed by DeviceBuffer::drop.
        let ptr = unsafe { dres::malloc_sync(bytes) }.map_err(|e| alloc_error(bytes, e))?;
        self.allocs.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(DeviceBuffer {
            ptr,
            bytes,
            ctx: self.ctx.clone(),
        })
    }

    /// Device allocations made so far (the zero-allocation test reads this).
    pub fn allocations(&self) -> usize {
        self.allocs.load(Ordering::Relaxed)
    }

    /// Bytes allocated so far (never decremented: a high-water mark of what was asked for).
    pub fn allocated_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| derr("cuMemGetInfo", e))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| derr("stream synchronize", e))
    }

    /// Makes the context current on the calling thread (raw driver calls need it).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| derr("binding the context", e))
    }

    pub(crate) fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// Copies host values into a device view whose elements have their size (synchronous).
    fn upload<E: Elem, T: Copy>(&self, dst: DView<E>, src: &[T], what: &str) -> Result<()> {
        debug_assert_eq!(std::mem::size_of::<T>(), E::BYTES);
        dst.need(src.len(), what)?;
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst holds at least src.len() elements of T's size (checked); the copy is
        // ordered on our stream and `src` stays borrowed until the stream is synchronised.
        unsafe { dres::memcpy_htod_async(dst.ptr, src, self.cu_stream()) }
            .map_err(|e| derr("host to device copy", e))?;
        self.synchronize()
    }

    /// Copies a device view to the host as values of its element size (waits for the
    /// stream first).
    fn download<E: Elem, T: Copy + Default>(&self, src: DView<E>) -> Result<Vec<T>> {
        debug_assert_eq!(std::mem::size_of::<T>(), E::BYTES);
        self.bind()?;
        let mut out = vec![T::default(); src.len];
        // SAFETY: src holds src.len elements of T's size; out has the same length and
        // outlives the copy (the stream is synchronised before returning).
        unsafe { dres::memcpy_dtoh_async(&mut out, src.ptr, self.cu_stream()) }
            .map_err(|e| derr("device to host copy", e))?;
        self.synchronize()?;
        Ok(out)
    }

    /// Copies host f32 into a device f32 view (synchronous).
    pub fn upload_f32(&self, dst: DView<f32>, src: &[f32]) -> Result<()> {
        self.upload(dst, src, "upload_f32")
    }

    /// Copies host bf16 bit patterns into a device bf16 view (synchronous).
    pub fn upload_bf16(&self, dst: DView<Bf16>, src: &[u16]) -> Result<()> {
        self.upload(dst, src, "upload_bf16")
    }

    /// Copies host i32 into a device i32 view (synchronous).
    pub fn upload_i32(&self, dst: DView<i32>, src: &[i32]) -> Result<()> {
        self.upload(dst, src, "upload_i32")
    }

    /// Copies a device i32 view to the host (waits for the stream first).
    pub fn download_i32(&self, src: DView<i32>) -> Result<Vec<i32>> {
        self.download(src)
    }

    /// Copies a device f32 view to the host (waits for the stream first).
    pub fn download_f32(&self, src: DView<f32>) -> Result<Vec<f32>> {
        self.download(src)
    }

    /// Copies a device bf16 view to the host as f32.
    pub fn download_bf16(&self, src: DView<Bf16>) -> Result<Vec<f32>> {
        let raw: Vec<u16> = self.download(src)?;
        Ok(raw
            .iter()
            .map(|&h| f32::from_bits((h as u32) << 16))
            .collect())
    }

    /// Device-to-device copy of `bytes` on the stream.
    pub fn copy_d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: callers pass pointers into live buffers with at least `bytes` bytes
        // (the typed wrappers below check view lengths).
        unsafe { dres::memcpy_dtod_async(dst, src, bytes, self.cu_stream()) }
            .map_err(|e| derr("device to device copy", e))
    }

    /// `dst[..n] = src[..n]` for typed views.
    pub fn copy<T: Elem>(&self, dst: DView<T>, src: DView<T>, n: usize) -> Result<()> {
        dst.need(n, "copy dst")?;
        src.need(n, "copy src")?;
        self.copy_d2d(dst.ptr, src.ptr, n * T::BYTES)
    }

    /// Fills a view with the byte `value` (0xFF poisons bf16 and f32 with NaN).
    pub fn fill_bytes<T: Elem>(&self, dst: DView<T>, value: u8) -> Result<()> {
        self.bind()?;
        // SAFETY: dst is a live view of dst.bytes() bytes.
        unsafe { dres::memset_d8_async(dst.ptr, value, dst.bytes(), self.cu_stream()) }
            .map_err(|e| derr("memset", e))
    }
}

fn load_module(
    ctx: &Arc<CudaContext>,
    module: KernelModule,
    (major, minor): (i32, i32),
) -> Result<(Arc<CudaModule>, String)> {
    let mut errors = Vec::new();
    for image in module.images(major, minor) {
        let (ptx, how) = match image {
            Image::Cubin(bytes) => (Ptx::from_binary(bytes.to_vec()), "cubin"),
            Image::Ptx(src) => (Ptx::from_src(src), "ptx compute_90a"),
        };
        match ctx.load_module(ptx) {
            Ok(m) => return Ok((m, format!("{how} (sm_{major}{minor})"))),
            Err(e) => errors.push(format!("{how}: {e:?}")),
        }
    }
    // Last resort: compile the source for this device with NVRTC (needs libnvrtc).
    // SAFETY: only tries to dlopen the NVRTC library.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(module.nvrtc_source(), opts) {
            Ok(ptx) => match ctx.load_module(ptx) {
                Ok(m) => return Ok((m, format!("nvrtc ({arch})"))),
                Err(e) => errors.push(format!("nvrtc load: {e:?}")),
            },
            Err(e) => errors.push(format!("nvrtc: {e}")),
        }
    } else {
        errors.push("nvrtc library not found".into());
    }
    Err(Error::Cuda(format!(
        "cannot load kernel module {} on sm_{major}{minor}: {}",
        module.name(),
        errors.join("; ")
    )))
}

/// CUDA-event timer on the device's stream.
pub struct Timer {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
}

impl Timer {
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Self {
            start: dev.ctx.new_event(flags).map_err(|e| derr("event", e))?,
            end: dev.ctx.new_event(flags).map_err(|e| derr("event", e))?,
        })
    }
    pub fn start(&self, dev: &CudaDevice) -> Result<()> {
        self.start
            .record(&dev.stream)
            .map_err(|e| derr("event record", e))
    }
    /// Records the end event, waits for it and returns the milliseconds since `start`.
    pub fn stop_ms(&self, dev: &CudaDevice) -> Result<f32> {
        self.end
            .record(&dev.stream)
            .map_err(|e| derr("event record", e))?;
        self.end.synchronize().map_err(|e| derr("event sync", e))?;
        self.start
            .elapsed_ms(&self.end)
            .map_err(|e| derr("event elapsed", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::{sys::CUresult, DriverError};

    #[test]
    fn out_of_memory_is_its_own_error() {
        let e = alloc_error(1 << 30, DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "out of GPU memory: allocating 1073741824 bytes"
        );
        // (Other codes are formatted through the driver's error strings, so they need one.)
    }
}
