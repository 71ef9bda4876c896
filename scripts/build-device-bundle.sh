#!/usr/bin/env bash
# Build, on a development machine (no GPU needed), everything the GPU machine runs:
#   dist/bin/dpir                 the CLI (release, stripped)
#   dist/bin/cuda_kernels         kernel-vs-CPU-reference tests
#   dist/bin/cuda_mmdit           CUDA MMDiT vs CPU MMDiT, CUDA-graph replay, zero-allocation loop
#   dist/bin/cuda_vae             CUDA VAE encoder/decoder vs the CPU VAE
#   dist/bin/cuda_clip            CUDA CLIP vision vs the CPU CLIP vision
#   dist/bin/cuda_restore         end-to-end restore on the GPU vs the CPU (PSNR >= 45 dB)
#   dist/bin/attention_check, vae_check   standalone kernel checks (scripts/build-dev-checks.sh)
#   dist/bin/candle_mmdit_cuda     the candle CUDA baseline (scripts/build-candle-cuda.sh; slow
#                                  the first time: skipped with --no-candle)
# Everything in dist/bin is then packed into dist/bundle.tar.xz (~5 MB instead of ~35: the
# working tree that travels to the GPU machine is limited, and the bundled model already takes
# 37 MB of it). Carry dist/bundle.tar.xz and .whl/ (the PyTorch baseline's diffusers wheels);
# scripts/device-check.sh OUTDIR unpacks the bundle there first.
#
#   scripts/build-device-bundle.sh [--no-candle]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p dist/bin
cargo build --release -p dpir-cli
cp target/release/dpir dist/bin/dpir
# The test executables: cargo prints their paths as JSON artifacts.
cargo test --release -p dpir-engine --test cuda_kernels --test cuda_mmdit --test cuda_vae --test cuda_clip --test cuda_restore --no-run --message-format=json \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        name = m["target"]["name"]
        if name.startswith("cuda_"):
            shutil.copy(m["executable"], "dist/bin/" + name)
            print("dist/bin/" + name)
'
scripts/build-dev-checks.sh
if [[ "${1:-}" != --no-candle ]]; then scripts/build-candle-cuda.sh; fi
# The PyTorch baseline's diffusers (the GPU machine has torch but no diffusers, no network).
if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps -d .whl \
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy_importer==0.1.0
fi
for f in dist/bin/*; do strip "$f" 2>/dev/null || true; done
# The GPU machine has no .git: the stamp says which sources the binaries were built from
# (device-check prints it), so a stale bundle shows in the run's log.
src=(engine cli kernels loader degrade benches baselines Cargo.toml Cargo.lock)
{ git rev-parse HEAD; [[ -z "$(git status --porcelain -- "${src[@]}")" ]] \
    || echo "with local changes"; } > dist/bin/BUNDLE_COMMIT
ls -la dist/bin
tar -cJf dist/bundle.tar.xz.tmp -C dist bin && mv dist/bundle.tar.xz.tmp dist/bundle.tar.xz
echo "dist/bundle.tar.xz: $(du -h dist/bundle.tar.xz | cut -f1) (carry: dist/bundle.tar.xz .whl)"
