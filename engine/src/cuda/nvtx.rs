//! NVTX ranges, so that Nsight Systems / Nsight Compute attribute GPU time to the MMDiT's ops.
//!
//! `libnvToolsExt.so.1` (the NVTX v2 ABI: `nvtxRangePushA`, `nvtxRangePop`) is loaded with
//! `libloading` on first use, like the CUDA libraries: nothing links against it, and when it
//! is absent every call is a silent no-op. Without a profiler attached the library's calls
//! are themselves near no-ops (NVTX forwards to an injected tool only when one is present).
//!
//! The MMDiT forward opens one range per op (the names of `dpir profile`) whenever it is
//! profiled, and always when `DPIR_NVTX=1` (e.g. under `nsys profile` without `dpir profile`).

use std::ffi::{c_char, c_int, CString};
use std::sync::OnceLock;

/// File names tried, in order.
const LIBRARY_NAMES: &[&str] = &["libnvToolsExt.so.1", "libnvToolsExt.so"];

type PushFn = unsafe extern "C" fn(*const c_char) -> c_int;
type PopFn = unsafe extern "C" fn() -> c_int;

/// The loaded library and its two entry points (the pointers stay valid while `_lib` lives).
struct Loaded {
    _lib: libloading::Library,
    push: PushFn,
    pop: PopFn,
}

/// NVTX entry points, or nothing when the library is absent.
pub struct Nvtx {
    loaded: Option<Loaded>,
}

impl Nvtx {
    /// Loads the first of `names` that opens and exports both entry points; none: a no-op
    /// instance.
    pub fn load(names: &[&str]) -> Self {
        Self {
            loaded: names.iter().find_map(|n| load_one(n)),
        }
    }

    /// Whether the library was found.
    pub fn available(&self) -> bool {
        self.loaded.is_some()
    }

    /// Opens a range named `name`; returns whether one was pushed (false without the library
    /// or for a name holding a NUL byte).
    pub fn push(&self, name: &str) -> bool {
        let Some(l) = &self.loaded else {
            return false;
        };
        let Ok(c) = CString::new(name) else {
            return false;
        };
        // SAFETY: `push` is nvtxRangePushA from the still-loaded library; it reads the
        // NUL-terminated string during the call only.
        unsafe { (l.push)(c.as_ptr()) };
        true
    }

    /// Closes the innermost range (a no-op without the library).
    pub fn pop(&self) {
        if let Some(l) = &self.loaded {
            // SAFETY: `pop` is nvtxRangePop from the still-loaded library; popping with no
            // open range is defined by NVTX (it returns a negative level).
            unsafe { (l.pop)() };
        }
    }
}

fn load_one(name: &str) -> Option<Loaded> {
    // SAFETY: loading libnvToolsExt runs no initialisers beyond NVTX's own (it only looks up
    // an injection library when a tool asks for one).
    let lib = unsafe { libloading::Library::new(name) }.ok()?;
    // SAFETY: the symbols have these C signatures in the NVTX v2 ABI
    // (`int nvtxRangePushA(const char*)`, `int nvtxRangePop(void)`); the copied function
    // pointers are only called while `lib` is kept alive next to them.
    let (push, pop) = unsafe {
        let push: PushFn = *lib.get::<PushFn>(b"nvtxRangePushA\0").ok()?;
        let pop: PopFn = *lib.get::<PopFn>(b"nvtxRangePop\0").ok()?;
        (push, pop)
    };
    Some(Loaded {
        _lib: lib,
        push,
        pop,
    })
}

/// The process-wide instance (loaded on first use).
pub fn global() -> &'static Nvtx {
    static NVTX: OnceLock<Nvtx> = OnceLock::new();
    NVTX.get_or_init(|| Nvtx::load(LIBRARY_NAMES))
}

/// Whether `DPIR_NVTX=1` asks for ranges without profiling (read once).
pub fn env_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DPIR_NVTX").is_ok_and(|v| v == "1"))
}

/// An open range of the global instance, closed on drop.
pub struct Range {
    pushed: bool,
}

impl Range {
    /// Opens `name` (a no-op without the library).
    pub fn push(name: &str) -> Self {
        Self {
            pushed: global().push(name),
        }
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.pushed {
            global().pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_library_is_a_no_op() {
        let n = Nvtx::load(&[
            "libdpir-no-such-nvtx.so.1",
            "/nonexistent/libnvToolsExt.so.1",
        ]);
        assert!(!n.available());
        assert!(!n.push("attention (flash)"));
        n.pop();
        // The RAII range of the global instance works whether or not the library exists here.
        {
            let r = Range::push("qkv GEMM");
            assert_eq!(r.pushed, global().available());
        }
    }

    #[test]
    fn name_with_nul_is_not_pushed() {
        // Whatever the library state, a name that cannot be a C string is skipped.
        assert!(!global().push("bad\0name"));
    }
}
