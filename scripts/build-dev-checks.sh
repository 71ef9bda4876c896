#!/usr/bin/env bash
# Builds the standalone llm.c-style kernel check + benchmark programs (kernels/dev/NAME_check.cu)
# into dist/bin/NAME_check, and writes the ptxas resource report of the production kernels
# each one checks (sm_90a and sm_80) to dist/bin/NAME_ptxas.txt.
#
#   scripts/build-dev-checks.sh [attention|vae]...     (no argument: all of them)
#
# Needs only a CUDA 13.0 toolchain (no GPU): NVCC / CUDA_HOME, nvcc on PATH, /usr/local/cuda,
# or the pip toolchain scripts/build-kernels.sh installs (the nvidia/cu13 layout). cudart is linked
# statically when libcudart_static.a is found, so the binaries run on a GPU machine with only
# the driver installed; libstdc++ stays dynamic (a static one needs glibc 2.36 for
# arc4random), so they need glibc >= 2.34 there, like the dpir binary.
#
# Run on the GPU machine: dist/bin/NAME_check [--quick]   (exit code 0 = every case passed)
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/nvcc.sh
source scripts/lib/nvcc.sh
NVCC_BIN="$(find_nvcc install)" || exit 1
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

# The production kernel sources each check program exercises.
kernel_sources() {
    case "$1" in
        attention) echo kernels/cuda/attention.cu ;;
        vae) echo kernels/cuda/vae_conv.cu kernels/cuda/vae_norm.cu ;;
        *) echo "error: unknown check \`$1\` (attention, vae)" >&2; exit 1 ;;
    esac
}

build_check() {
    local name="$1" srcs
    srcs="$(kernel_sources "$name")"
    mkdir -p dist/bin
    "$NVCC_BIN" -O3 -std=c++17 "${GENCODE[@]}" -lineinfo \
        -Xcompiler -Wall,-Wno-unused-function \
        -L"$LIBDIR" "${CUDART[@]}" \
        "kernels/dev/${name}_check.cu" -o "dist/bin/${name}_check" -ldl -lpthread
    {
        for src in $srcs; do
            echo "# ptxas resource report: $src ($("$NVCC_BIN" --version | tail -1))"
            for arch in "compute_90a,code=sm_90a" "compute_80,code=sm_80"; do
                "$NVCC_BIN" -cubin -O3 -std=c++17 -gencode=arch=$arch -Xptxas -v \
                    "$src" -o /dev/null 2>&1 | grep -E "Compiling|registers|spill"
            done
        done
    } > "dist/bin/${name}_ptxas.txt"
    cat "dist/bin/${name}_ptxas.txt"
    # The check program's own sm_90a image (-lineinfo, other translation unit): the same
    # wgmma register-hazard lint as the production cubins (scripts/sass-lint.py).
    local cubin nvd
    nvd="$(find_nvdisasm install)" || exit 1
    cubin="$(mktemp --suffix=.cubin)"
    "$NVCC_BIN" -cubin -O3 -std=c++17 -lineinfo -gencode=arch=compute_90a,code=sm_90a \
        "kernels/dev/${name}_check.cu" -o "$cubin"
    NVDISASM="$nvd" python3 scripts/sass-lint.py "$cubin" || {
        rm -f "$cubin"
        echo "error: scripts/sass-lint.py failed on ${name}_check: hazards or a tool error (above)" >&2
        exit 1
    }
    rm -f "$cubin"
    local glibc_max
    glibc_max="$(objdump -T "dist/bin/${name}_check" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)"
    echo "built dist/bin/${name}_check ($CUDART_NOTE; needs ${glibc_max:-glibc ?})"
}

names=("$@")
(( ${#names[@]} )) || names=(attention vae)
for name in "${names[@]}"; do
    build_check "$name"
done
