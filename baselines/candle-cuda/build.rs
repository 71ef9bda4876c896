//! candle-kernels links `libmoe.a`: ~33 MB of MoE and GGUF CUDA kernels that the MMDiT never
//! calls. scripts/build-candle-cuda.sh builds a stand-in archive, `libmoe_stub.a` (the same
//! entry points, each exits with an error), and names its folder here. Linked whole and ahead
//! of the dependencies, it defines those symbols first, so the linker pulls nothing from the
//! real archive. Unset, the real kernels are linked.
fn main() {
    println!("cargo:rerun-if-env-changed=CANDLE_MOE_STUB_DIR");
    if let Some(dir) = std::env::var_os("CANDLE_MOE_STUB_DIR") {
        println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
        println!("cargo:rustc-link-lib=static:+whole-archive=moe_stub");
    }
}
