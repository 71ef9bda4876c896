#!/usr/bin/env bash
# Build the candle CUDA baseline on a development machine (no GPU, no CUDA driver needed):
#   dist/bin/candle_mmdit_cuda          launcher (sh): unpacks the binary below once into
#                                       ${TMPDIR:-/tmp}; one-line error when a CUDA library is
#                                       missing, else runs it
#   dist/bin/candle_mmdit_cuda.elf.xz   candle-transformers 0.11.1 MMDiT forward on CUDA
#                                       (stripped, 15 MB; 1.5 MB compressed)
# The crate is baselines/candle-cuda/, outside the workspace: candle-core's `cuda` feature
# turns on cudarc's `dynamic-linking`, which cannot be unified with the workspace's
# `dynamic-loading`. It builds into target/candle-cuda/ with its own Cargo.lock.
#
# What this does (idempotent; prints the time of each stage):
#   1. nvcc: $NVCC, else `nvcc` on PATH, else the pinned CUDA 13.0 pip toolchain (as
#      scripts/build-kernels.sh), installed on first use into
#      ${DPIR_CUDA_CACHE:-$HOME/.cache/dpir/cuda-13.0}. candle-kernels is compiled for sm_90 only.
#   2. cuBLAS and cuRAND (CUDA 13 wheels: libcublas.so.13, libcublasLt.so.13, libcurand.so.10),
#      link-time only, into ${DPIR_CUDA_LIBS_CACHE:-$HOME/.cache/dpir/cuda-13.0-libs}.
#   3. A stub libcuda.so (soname libcuda.so.1) defining every driver entry point that cudarc
#      binds, each returning CUDA_ERROR_STUB_LIBRARY (34); no wheel ships one. At run time the
#      driver's own libcuda.so.1 is loaded instead (the stub is never shipped).
#      Also a stand-in for candle-kernels' libmoe.a (MoE/GGUF kernels the MMDiT never calls;
#      33 MB of the binary otherwise; see baselines/candle-cuda/build.rs), and an nvcc wrapper
#      that skips compiling those kernels.
#   4. cargo build --release (nice -n 19), strip, copy, check the NEEDED list, and run the
#      binary here: without a driver the launcher must print "no CUDA driver", and with the
#      stub the binary itself must fail cleanly ("no usable CUDA device").
# The first build takes ~10 min on 2 shared cores (candle-kernels' PTX ~1 min of it); later
# runs take seconds.
#
# The binary needs libcuda.so.1 (the driver's), libcublas.so.13 (which loads libcublasLt.so.13)
# and libcurand.so.10, plus glibc >= 2.34. On the GPU machine (driver 580 / CUDA 13.0), from the
# repo root, with LD_LIBRARY_PATH holding the CUDA 13 libraries the way scripts/device-check.sh
# computes it (PyTorch's site-packages/nvidia/cu13/lib, else /usr/local/cuda/lib64):
#   dist/bin/candle_mmdit_cuda --config sd3-medium-1024 --warmup 3 --reps 10 [--json FILE]
#   dist/bin/candle_mmdit_cuda --config sd35-medium-1024 --warmup 2 --reps 5
# Each prints one JSON line on stdout, {"baseline":"candle-cuda","config":..,"dtype":"f16",
# "step_ms":<median>,"device":..,"tflops":..,...}, errors as one line on stderr (exit 1; the
# launcher exits 3 when a library is missing). F16: candle's MMDiT casts its timestep
# embedding to F16, so other weight dtypes fail. Attention is candle's default path (the full
# score matrix through cuBLAS and a softmax kernel), not flash-attn. Random weights, made on
# the GPU (2.08 B parameters for SD3-medium, 2.47 B for SD3.5-medium).
# Without a GPU, `--device cpu --depth 4 --latent 16` runs the same code on the CPU (with
# LD_LIBRARY_PATH=target/candle-cuda/cuda-link/lib so the CUDA libraries resolve).
#
#   scripts/build-candle-cuda.sh            build, check, copy to dist/bin/
#   scripts/build-candle-cuda.sh --clippy   clippy on the crate (same environment and target dir)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=build
case "${1:-}" in
  --clippy) MODE=clippy ;;
  "") ;;
  *) echo "usage: $0 [--clippy]" >&2; exit 2 ;;
esac
ROOT="$PWD"
CRATE=baselines/candle-cuda
export CARGO_TARGET_DIR="${CANDLE_CUDA_TARGET_DIR:-$ROOT/target/candle-cuda}"   # inside the ignored target/
LINKDIR="$CARGO_TARGET_DIR/cuda-link/lib"
T_ALL=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T_ALL ))s] $*" >&2; }

# --- 1. nvcc ------------------------------------------------------------------------------
# shellcheck source=scripts/lib/nvcc.sh
source scripts/lib/nvcc.sh
NVCC_BIN="$(find_nvcc install)" || exit 1
[[ -x "$NVCC_BIN" ]] || { echo "error: nvcc not usable: $NVCC_BIN" >&2; exit 1; }
NVCC_VER="$("$NVCC_BIN" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
[[ "$NVCC_VER" == 13.0 ]] || { echo "error: need nvcc 13.0 (the GPU machines' driver is CUDA 13.0), got $NVCC_VER at $NVCC_BIN" >&2; exit 1; }
CUDA_DIR="$(cd "$(dirname "$NVCC_BIN")/.." && pwd)"   # .../cu13 (bin, include, lib)
stamp "nvcc $NVCC_VER: $NVCC_BIN"

# --- 2. cuBLAS / cuRAND for linking -------------------------------------------------------
LIBS_CACHE="${DPIR_CUDA_LIBS_CACHE:-$HOME/.cache/dpir/cuda-13.0-libs}"
if [[ ! -e "$LIBS_CACHE/nvidia/cu13/lib/libcublas.so.13" || ! -e "$LIBS_CACHE/nvidia/cu13/lib/libcurand.so.10" ]]; then
  echo "installing cuBLAS/cuRAND 13.0 wheels (link-time only) into $LIBS_CACHE" >&2
  python3 -m pip install -q --no-deps --target "$LIBS_CACHE" \
    nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 >&2
fi
stamp "cuBLAS/cuRAND: $LIBS_CACHE/nvidia/cu13/lib"

# --- 3. link folder: stub libcuda + the wheels' libraries under their link names ----------
pkg_dir() {   # pkg_dir NAME: the source folder of dependency NAME
  cargo metadata --locked --format-version 1 --manifest-path "$CRATE/Cargo.toml" | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == sys.argv[1]))' "$1"
}
CUDARC_SRC="$(pkg_dir cudarc)"
KERNELS_SRC="$(pkg_dir candle-kernels)"
mkdir -p "$LINKDIR"
STUB_C="$CARGO_TARGET_DIR/cuda-link/libcuda_stub.c"
{
  echo "/* Link-time stand-in for the CUDA driver (generated by scripts/build-candle-cuda.sh)."
  echo "   Every entry point returns CUDA_ERROR_STUB_LIBRARY (34). */"
  grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC_SRC/src/driver/sys/mod.rs" \
    | awk '{print $4}' | sort -u | sed 's/.*/int &(void) { return 34; }/'
} > "$STUB_C.new"
if ! cmp -s "$STUB_C.new" "$STUB_C" || [[ ! -e "$LINKDIR/libcuda.so" ]]; then
  mv "$STUB_C.new" "$STUB_C"
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$LINKDIR/libcuda.so" "$STUB_C"
else
  rm -f "$STUB_C.new"
fi
ln -sf libcuda.so "$LINKDIR/libcuda.so.1"
link_lib() {   # link_lib DIR SONAME: DIR/SONAME as LINKDIR/SONAME and LINKDIR/libNAME.so
  local dir="$1" so="$2"
  [[ -e "$dir/$so" ]] || { echo "error: $dir/$so missing" >&2; exit 1; }
  ln -sf "$dir/$so" "$LINKDIR/$so"
  ln -sf "$dir/$so" "$LINKDIR/${so%%.so*}.so"
}
link_lib "$LIBS_CACHE/nvidia/cu13/lib" libcublas.so.13
link_lib "$LIBS_CACHE/nvidia/cu13/lib" libcublasLt.so.13
link_lib "$LIBS_CACHE/nvidia/cu13/lib" libcurand.so.10
link_lib "$CUDA_DIR/lib" libnvrtc.so.13
link_lib "$CUDA_DIR/lib" libcudart.so.13
stamp "stub libcuda.so ($(grep -c '^int ' "$STUB_C") entry points) and link folder: $LINKDIR"

# candle-kernels also links libmoe.a, ~33 MB of MoE/GGUF kernels the MMDiT never calls: link
# a stand-in with the same entry points instead (see baselines/candle-cuda/build.rs).
[[ -f "$KERNELS_SRC/src/ffi.rs" ]] || { echo "error: candle-kernels source not found at $KERNELS_SRC" >&2; exit 1; }
MOE_DIR="$CARGO_TARGET_DIR/cuda-link/moe-stub"
mkdir -p "$MOE_DIR"
{
  echo "/* Stand-in for candle-kernels' libmoe.a (generated by scripts/build-candle-cuda.sh). */"
  echo "#include <stdio.h>"
  echo "#include <stdlib.h>"
  echo "static void missing(const char *f) {"
  echo "  fprintf(stderr, \"candle_mmdit_cuda: %s (candle MoE/GGUF kernels) is not built in\\n\", f);"
  echo "  exit(1);"
  echo "}"
  grep -oE 'pub fn [A-Za-z0-9_]+' "$KERNELS_SRC/src/ffi.rs" | awk '{print $3}' | sort -u \
    | sed 's/.*/void &(void) { missing("&"); }/'
} > "$MOE_DIR/moe_stub.c.new"
if ! cmp -s "$MOE_DIR/moe_stub.c.new" "$MOE_DIR/moe_stub.c" || [[ ! -e "$MOE_DIR/libmoe_stub.a" ]]; then
  mv "$MOE_DIR/moe_stub.c.new" "$MOE_DIR/moe_stub.c"
  cc -c -fPIC -O1 -o "$MOE_DIR/moe_stub.o" "$MOE_DIR/moe_stub.c"
  rm -f "$MOE_DIR/libmoe_stub.a"; ar rcs "$MOE_DIR/libmoe_stub.a" "$MOE_DIR/moe_stub.o"
else
  rm -f "$MOE_DIR/moe_stub.c.new"
fi
export CANDLE_MOE_STUB_DIR="$MOE_DIR"
# ... and skip compiling them (~9.5 of the ~11 min candle-kernels takes here): the nvcc that
# candle-kernels' build script runs turns those sources into empty objects.
NVCC_WRAP="$CARGO_TARGET_DIR/cuda-link/bin/nvcc"
mkdir -p "$(dirname "$NVCC_WRAP")"
cat > "$NVCC_WRAP.new" <<SH
#!/bin/sh
# nvcc for candle-kernels' build script (generated by scripts/build-candle-cuda.sh): the real
# nvcc, except that candle's MoE/GGUF sources compile to empty objects (libmoe_stub.a stands in).
out=; prev=; compile=0; last=
for a in "\$@"; do
  [ "\$prev" = -o ] && out="\$a"
  [ "\$a" = -c ] && compile=1
  prev="\$a"; last="\$a"
done
if [ \$compile = 1 ] && [ -n "\$out" ]; then
  case "\$last" in
    src/moe/*|*/src/moe/*|src/mmq_gguf/*|*/src/mmq_gguf/*|src/mmvq_gguf.cu|*/src/mmvq_gguf.cu)
      exec cc -c -x c /dev/null -o "\$out" ;;
  esac
fi
exec "$NVCC_BIN" "\$@"
SH
if cmp -s "$NVCC_WRAP.new" "$NVCC_WRAP"; then rm -f "$NVCC_WRAP.new"; else mv "$NVCC_WRAP.new" "$NVCC_WRAP"; fi
chmod +x "$NVCC_WRAP"
stamp "libmoe.a stand-in ($(grep -c '^void ' "$MOE_DIR/moe_stub.c") entry points): $MOE_DIR"

# --- 4. build -----------------------------------------------------------------------------
export PATH="$(dirname "$NVCC_BIN"):$PATH"   # cudarc's build script runs `nvcc --version`
export NVCC="$NVCC_WRAP" CUDA_ROOT="$CARGO_TARGET_DIR/cuda-link" CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP=90 CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
unset CUDA_HOME CUDA_PATH CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB
if [[ "$MODE" == clippy ]]; then
  nice -n 19 cargo clippy --release --locked --manifest-path "$CRATE/Cargo.toml" --all-targets -- -D warnings
  exit 0
fi
T_BUILD=$(date +%s)
nice -n 19 cargo build --release --locked --manifest-path "$CRATE/Cargo.toml"
BUILD_S=$(( $(date +%s) - T_BUILD ))
stamp "cargo build --release: ${BUILD_S}s"

BIN="$CARGO_TARGET_DIR/release/candle_mmdit_cuda"
ELF="$CARGO_TARGET_DIR/candle_mmdit_cuda.elf"   # stripped
cp "$BIN" "$ELF"
strip "$ELF"
# Shipped xz-compressed (the PTX text that candle embeds compresses ~10x); the launcher
# unpacks it once per version into ${TMPDIR:-/tmp}.
mkdir -p dist/bin
rm -f dist/bin/candle_mmdit_cuda.elf
if command -v xz >/dev/null 2>&1; then
  xz -T1 -6 -c "$ELF" > dist/bin/candle_mmdit_cuda.elf.xz
else
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], "rb"), lzma.open(sys.argv[2], "wb", preset=6))' \
    "$ELF" dist/bin/candle_mmdit_cuda.elf.xz
fi
cat > dist/bin/candle_mmdit_cuda <<'SH'
#!/bin/sh
# Launcher for the candle CUDA baseline (built by scripts/build-candle-cuda.sh). The binary
# ships xz-compressed beside this file and is unpacked once into ${TMPDIR:-/tmp}. It links the
# CUDA driver and libraries, so without them the dynamic loader would stop it before it
# starts: this says which is missing, in one line, instead.
packed="$(dirname "$0")/candle_mmdit_cuda.elf.xz"
[ -f "$packed" ] || { echo "candle_mmdit_cuda: $packed missing" >&2; exit 3; }
bin="${TMPDIR:-/tmp}/candle_mmdit_cuda-$(cksum < "$packed" | cut -d ' ' -f 1).elf"
if [ ! -x "$bin" ]; then
  tmp="$bin.$$"
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$packed" > "$tmp"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$packed" "$tmp"
  fi || { rm -f "$tmp"; echo "candle_mmdit_cuda: cannot unpack $packed into ${TMPDIR:-/tmp}" >&2; exit 3; }
  chmod +x "$tmp" && mv -f "$tmp" "$bin" || { rm -f "$tmp"; echo "candle_mmdit_cuda: cannot write $bin" >&2; exit 3; }
fi
if command -v ldd >/dev/null 2>&1; then
  missing=$(ldd "$bin" 2>/dev/null | awk '/=> not found/ {printf "%s ", $1}')
  case " $missing" in
    *" libcuda.so.1 "*) echo "candle_mmdit_cuda: no CUDA driver (libcuda.so.1 not found)" >&2; exit 3 ;;
  esac
  if [ -n "$missing" ]; then
    echo "candle_mmdit_cuda: CUDA libraries not found: ${missing% } (put their folder on LD_LIBRARY_PATH)" >&2
    exit 3
  fi
fi
exec "$bin" "$@"
SH
chmod +x dist/bin/candle_mmdit_cuda

# --- checks -------------------------------------------------------------------------------
echo "binary: $(stat -c %s "$ELF") bytes stripped, dist/bin/candle_mmdit_cuda.elf.xz $(stat -c %s dist/bin/candle_mmdit_cuda.elf.xz) bytes"
NEEDED="$(readelf -d "$ELF" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort | tr '\n' ' ')"
echo "NEEDED: $NEEDED"
bad=""
for n in $NEEDED; do
  case "$n" in
    libcuda.so.1|libcublas.so.13|libcublasLt.so.13|libcurand.so.10|libnvrtc.so.13|libcudart.so.13) ;;
    libc.so.6|libm.so.6|libgcc_s.so.1|libstdc++.so.6|libdl.so.2|libpthread.so.0|librt.so.1|ld-linux-x86-64.so.2) ;;
    *) bad+="$n " ;;
  esac
done
[[ -z "$bad" ]] || { echo "error: unexpected NEEDED entries: $bad" >&2; exit 1; }
for n in libcuda.so.1 libcublas.so.13; do
  [[ " $NEEDED" == *" $n "* ]] || { echo "error: $n missing from NEEDED: the CUDA libraries were not linked" >&2; exit 1; }
done
if readelf -S "$ELF" | grep -q '\.nv_fatbin'; then
  echo "error: the MoE/GGUF kernels were linked (the libmoe.a stand-in was not taken)" >&2; exit 1
fi
echo "driver entry points used: $(nm -D --undefined-only "$BIN" | awk '$2 ~ /^cu[A-Z]/ {print $2}' | sort -u | wc -l)"
newest() { objdump -T "$ELF" | grep -o "$1[0-9.]*" | sort -Vu | tail -n 1; }
echo "newest symbol versions: $(newest GLIBC_), libstdc++ $(newest GLIBCXX_ | grep . || echo none)"

export TMPDIR="$CARGO_TARGET_DIR/tmp"   # where the launcher unpacks the binary in these checks
rm -rf "$TMPDIR"; mkdir -p "$TMPDIR"
# Without a driver: the launcher must say so in one line (exit 3).
if [[ -z "$(ldconfig -p 2>/dev/null | grep 'libcuda.so.1 ')" ]]; then
  set +e; msg="$(LD_LIBRARY_PATH= dist/bin/candle_mmdit_cuda 2>&1)"; rc=$?; set -e
  echo "no driver: rc $rc: $msg"
  [[ $rc == 3 && "$msg" == *"no CUDA driver"* ]] || { echo "error: launcher did not report the missing driver" >&2; exit 1; }
  # With the stub driver: the binary itself must fail cleanly, one line, no panic.
  set +e; msg="$(LD_LIBRARY_PATH="$LINKDIR" dist/bin/candle_mmdit_cuda 2>&1)"; rc=$?; set -e
  echo "stub driver: rc $rc: $msg"
  [[ $rc == 1 && "$msg" == "candle_mmdit_cuda: no usable CUDA device"* && $(echo "$msg" | wc -l) == 1 ]] \
    || { echo "error: the binary did not fail cleanly on the stub driver" >&2; exit 1; }
fi
# The same program on the CPU (a narrow model): the weights, the SD3.5 blocks and the JSON.
smoke="$CARGO_TARGET_DIR/cpu-smoke.json"
for c in sd3-medium-1024 sd35-medium-1024; do
  rm -f "$smoke"
  LD_LIBRARY_PATH="$LINKDIR" dist/bin/candle_mmdit_cuda --device cpu --config "$c" --depth 3 \
    --latent 8 --context-len 4 --warmup 1 --reps 1 --json "$smoke" > /dev/null
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["step_ms"] > 0 and d["config"] == sys.argv[2]; print("cpu smoke:", d["config"], d["params"], "parameters,", round(d["step_ms"], 1), "ms")' "$smoke" "$c"
done
stamp "done"
