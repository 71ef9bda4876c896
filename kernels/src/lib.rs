//! The dpir CUDA kernels, compiled ahead of time and embedded.
//!
//! Sources live in `kernels/cuda/*.cu` (one file per op family); `scripts/build-kernels.sh`
//! compiles each to a cubin for `sm_90a` and `sm_80` and to PTX for `compute_90a` in
//! `kernels/compiled/` (checked in, so building this crate needs no CUDA toolchain;
//! `scripts/build-kernels.sh --check` proves the files match their sources). This crate only
//! hands out bytes: loading them is the engine's job (`engine/src/cuda`).

/// One kernel source file, i.e. one loadable module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelModule {
    /// `norm.cu`: adaLN modulate, gated residual, qk RMSNorm, LQ alignment, affine LayerNorm.
    Norm,
    /// `act.cu`: GELU/SiLU/quick-GELU, add, dtype conversions, timestep embedding, softmax.
    Act,
    /// `layout.cu`: patchify, pos-embed crop-add, unpatchify, CFG + Euler, head split/merge.
    Layout,
    /// `vae.cu`: GroupNorm(+SiLU), nearest 2x upsample, 3x3 im2col.
    Vae,
    /// `attention.cu`: fused joint flash attention (head_dim 64), optional qk-RMSNorm.
    Attention,
    /// `vae_conv.cu`: NHWC bf16 convolutions (implicit GEMM on tensor cores, generic
    /// fallback) with bias, residual and fused nearest-2x-upsample epilogues.
    VaeConv,
    /// `vae_norm.cu`: NHWC GroupNorm(+SiLU) in two passes, nearest 2x upsample, NCHW f32 <->
    /// NHWC bf16 layout conversions.
    VaeNorm,
}

/// What a module can be loaded from, best first.
#[derive(Clone, Copy, Debug)]
pub enum Image {
    /// A cubin for exactly this device's architecture family.
    Cubin(&'static [u8]),
    /// PTX the driver JIT-compiles.
    Ptx(&'static str),
}

macro_rules! module_files {
    ($($variant:ident => $stem:literal),* $(,)?) => {
        impl KernelModule {
            /// Every module, in load order.
            pub const ALL: &'static [KernelModule] = &[$(KernelModule::$variant),*];

            /// The source file stem (`norm` for `norm.cu`).
            pub fn name(self) -> &'static str {
                match self { $(KernelModule::$variant => $stem),* }
            }

            /// The cubin for compute capability 9.0 (`sm_90a`).
            pub fn cubin_sm90a(self) -> &'static [u8] {
                match self {
                    $(KernelModule::$variant =>
                        include_bytes!(concat!("../compiled/", $stem, ".sm_90a.cubin"))),*
                }
            }

            /// The cubin for compute capability 8.x (`sm_80`).
            pub fn cubin_sm80(self) -> &'static [u8] {
                match self {
                    $(KernelModule::$variant =>
                        include_bytes!(concat!("../compiled/", $stem, ".sm_80.cubin"))),*
                }
            }

            /// PTX for `compute_90a` (JIT-compiled by the driver on a 9.0 device).
            pub fn ptx_compute90a(self) -> &'static str {
                match self {
                    $(KernelModule::$variant =>
                        include_str!(concat!("../compiled/", $stem, ".compute_90a.ptx"))),*
                }
            }

            /// The CUDA C++ source, for the NVRTC fallback. Files that include
            /// `common.cuh` need [`COMMON_HEADER`] prepended (see [`KernelModule::nvrtc_source`]).
            pub fn source(self) -> &'static str {
                match self {
                    $(KernelModule::$variant =>
                        include_str!(concat!("../cuda/", $stem, ".cu"))),*
                }
            }
        }
    };
}

module_files! {
    Norm => "norm",
    Act => "act",
    Layout => "layout",
    Vae => "vae",
    Attention => "attention",
    VaeConv => "vae_conv",
    VaeNorm => "vae_norm",
}

/// `kernels/cuda/common.cuh`, the header the dpir kernels share.
pub const COMMON_HEADER: &str = include_str!("../cuda/common.cuh");

/// The ptxas resource report written by `scripts/build-kernels.sh`.
pub const RESOURCES: &str = include_str!("../compiled/RESOURCES.txt");

impl KernelModule {
    /// The embedded images usable on a device of compute capability `(major, minor)`, best
    /// first: the matching cubin, then PTX. Empty when only NVRTC can help.
    pub fn images(self, major: i32, minor: i32) -> Vec<Image> {
        match (major, minor) {
            (9, 0) => vec![
                Image::Cubin(self.cubin_sm90a()),
                Image::Ptx(self.ptx_compute90a()),
            ],
            (8, _) => vec![Image::Cubin(self.cubin_sm80())],
            _ => Vec::new(),
        }
    }

    /// The source as one self-contained translation unit for NVRTC (the shared header
    /// inlined in place of its `#include`).
    pub fn nvrtc_source(self) -> String {
        self.source()
            .replace("#include \"common.cuh\"", COMMON_HEADER)
            .replace("#pragma once", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_has_all_images() {
        for m in KernelModule::ALL {
            // An ELF cubin starts with the ELF magic; PTX names its target.
            assert_eq!(&m.cubin_sm90a()[..4], b"\x7fELF", "{}", m.name());
            assert_eq!(&m.cubin_sm80()[..4], b"\x7fELF", "{}", m.name());
            assert!(
                m.ptx_compute90a().contains(".target sm_90a"),
                "{}",
                m.name()
            );
            assert!(m.source().contains("extern \"C\""), "{}", m.name());
        }
    }

    #[test]
    fn images_follow_the_device() {
        assert_eq!(KernelModule::Norm.images(9, 0).len(), 2);
        assert_eq!(KernelModule::Norm.images(8, 6).len(), 1);
        assert!(KernelModule::Norm.images(12, 0).is_empty());
        assert_eq!(KernelModule::VaeConv.name(), "vae_conv");
        assert_eq!(KernelModule::VaeNorm.images(9, 0).len(), 2);
        assert!(!KernelModule::Norm
            .nvrtc_source()
            .contains("#include \"common.cuh\""));
    }

    #[test]
    fn resource_report_lists_every_module() {
        for m in KernelModule::ALL {
            assert!(
                RESOURCES.contains(&format!("## {}.cu (sm_90a)", m.name())),
                "{}",
                m.name()
            );
        }
    }
}
