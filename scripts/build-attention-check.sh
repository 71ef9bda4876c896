#!/usr/bin/env bash
# Builds the joint flash attention check + benchmark program (kernels/dev/attention_check.cu)
# into dist/bin/attention_check. Needs only a CUDA 13.0 toolchain (no GPU): nvcc on PATH, or
# CUDA_HOME / NVCC pointing at one (the pip wheels' nvidia/cu13 layout and /usr/local/cuda both
# work). cudart is linked statically when libcudart_static.a is found, so the binary runs on a
# GPU machine with only the driver installed; libstdc++ stays dynamic (a static one needs
# glibc 2.36 for arc4random), so the binary needs glibc >= 2.34 there, like the dpir binary.
# Also writes the ptxas resource report of the production kernels for sm_90a and sm_80 to
# dist/bin/attention_ptxas.txt.
#
# Run on the GPU machine: dist/bin/attention_check [--quick]   (exit code 0 = every case passed)
set -euo pipefail
cd "$(dirname "$0")/.."

find_nvcc() {
    if [[ -n "${NVCC:-}" ]]; then echo "$NVCC"; return; fi
    if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then echo "$CUDA_HOME/bin/nvcc"; return; fi
    if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
    if [[ -x /usr/local/cuda/bin/nvcc ]]; then echo /usr/local/cuda/bin/nvcc; return; fi
    echo "error: nvcc not found (set NVCC or CUDA_HOME, or put a CUDA 13.0 nvcc on PATH)" >&2
    exit 1
}
NVCC_BIN="$(find_nvcc)"
CUDA_ROOT="$(cd "$(dirname "$NVCC_BIN")/.." && pwd)"

# Library directory holding cudart (pip wheels: lib/, toolkits: lib64/ or targets/*/lib).
LIBDIR=""
for d in "$CUDA_ROOT/lib" "$CUDA_ROOT/lib64" "$CUDA_ROOT"/targets/*/lib; do
    if [[ -e "$d/libcudart_static.a" || -e "$d/libcudart.so" || -e "$d/libcudart.so.13" ]]; then
        LIBDIR="$d"; break
    fi
done
if [[ -z "$LIBDIR" ]]; then
    echo "error: no cudart library found under $CUDA_ROOT" >&2
    exit 1
fi
if [[ -e "$LIBDIR/libcudart_static.a" ]]; then
    CUDART=(-cudart static)
    CUDART_NOTE="cudart linked statically"
else
    CUDART=(-cudart shared)
    CUDART_NOTE="cudart linked dynamically: the GPU machine needs libcudart.so.13 on LD_LIBRARY_PATH"
fi

GENCODE=(-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80
         -gencode=arch=compute_90a,code=compute_90a)

mkdir -p dist/bin
"$NVCC_BIN" -O3 -std=c++17 "${GENCODE[@]}" -lineinfo \
    -Xcompiler -Wall,-Wno-unused-function \
    -L"$LIBDIR" "${CUDART[@]}" \
    kernels/dev/attention_check.cu -o dist/bin/attention_check -ldl -lpthread

{
    echo "# ptxas resource report: kernels/cuda/attention.cu ($("$NVCC_BIN" --version | tail -1))"
    for arch in "compute_90a,code=sm_90a" "compute_80,code=sm_80"; do
        "$NVCC_BIN" -cubin -O3 -std=c++17 -gencode=arch=$arch -Xptxas -v \
            kernels/cuda/attention.cu -o /dev/null 2>&1 | grep -E "Compiling|registers|spill"
    done
} > dist/bin/attention_ptxas.txt
cat dist/bin/attention_ptxas.txt
GLIBC_MAX="$(objdump -T dist/bin/attention_check 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)"
echo "built dist/bin/attention_check ($CUDART_NOTE; needs ${GLIBC_MAX:-glibc ?})"
