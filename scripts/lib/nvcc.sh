# Sourced by the scripts that compile CUDA (build-kernels.sh, build-dev-checks.sh,
# build-candle-cuda.sh): `find_nvcc` prints the nvcc to use — $NVCC, else $CUDA_HOME/bin/nvcc,
# else `nvcc` on PATH, else the pinned CUDA 13.0 pip toolchain in
# ${DPIR_CUDA_CACHE:-$HOME/.cache/dpir/cuda-13.0} (installed there on first use with
# `find_nvcc install`), else /usr/local/cuda/bin/nvcc. Pin 13.0.x: the GPU machines' driver
# is CUDA 13.0, and newer NVRTC/ptxas emit code it cannot load.
find_nvcc() {
  if [[ -n "${NVCC:-}" ]]; then echo "$NVCC"; return; fi
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then echo "$CUDA_HOME/bin/nvcc"; return; fi
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
  local cache="${DPIR_CUDA_CACHE:-$HOME/.cache/dpir/cuda-13.0}"
  if [[ ! -x "$cache/nvidia/cu13/bin/nvcc" && "${1:-}" == install ]]; then
    echo "nvcc not found: installing the pinned CUDA 13.0 toolchain into $cache" >&2
    python3 -m pip install -q --target "$cache" \
      nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvcc==13.0.88 \
      nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 >&2
  fi
  if [[ -x "$cache/nvidia/cu13/bin/nvcc" ]]; then echo "$cache/nvidia/cu13/bin/nvcc"; return; fi
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then echo /usr/local/cuda/bin/nvcc; return; fi
  echo "error: nvcc not found (run scripts/build-kernels.sh once to install the pinned CUDA 13.0 toolchain, or set NVCC / CUDA_HOME)" >&2
  return 1
}

# `find_nvdisasm [install]` prints the nvdisasm for scripts/sass-lint.py: $NVDISASM, else next
# to the nvcc in use, else the pinned pip wheel in ${DPIR_NVDISASM_CACHE:-$HOME/.cache/dpir/
# nvdisasm-13.2.86} (installed there with `install`; its own folder, because `pip --target`
# would replace the toolchain's nvidia/ tree). A disassembler only reads cubins, so it need
# not match the 13.0 pin (PyPI has no 13.0 nvdisasm wheel; 13.2.86 is pinned).
find_nvdisasm() {
  if [[ -n "${NVDISASM:-}" ]]; then echo "$NVDISASM"; return; fi
  local nvcc; nvcc="$(find_nvcc 2>/dev/null)" || true
  if [[ -n "$nvcc" && -x "$(dirname "$nvcc")/nvdisasm" ]]; then echo "$(dirname "$nvcc")/nvdisasm"; return; fi
  local cache="${DPIR_NVDISASM_CACHE:-$HOME/.cache/dpir/nvdisasm-13.2.86}"
  if [[ ! -x "$cache/nvidia/cu13/bin/nvdisasm" && "${1:-}" == install ]]; then
    echo "nvdisasm not found: installing nvidia-cuda-nvdisasm==13.2.86 into $cache" >&2
    python3 -m pip install -q --no-deps --target "$cache" nvidia-cuda-nvdisasm==13.2.86 >&2
  fi
  if [[ -x "$cache/nvidia/cu13/bin/nvdisasm" ]]; then echo "$cache/nvidia/cu13/bin/nvdisasm"; return; fi
  echo "error: nvdisasm not found (set NVDISASM, or let scripts/build-kernels.sh install it)" >&2
  return 1
}
