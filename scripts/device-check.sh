#!/usr/bin/env bash
# The one command to run on a GPU machine, from the repo root. Builds nothing: it runs the
# binaries prebuilt by scripts/build-device-bundle.sh (dist/bin/): the GPU tests, the
# standalone kernel checks (dist/bin/*_check), the benches, and the baselines: candle CUDA
# (dist/bin/candle_mmdit_cuda) and PyTorch (diffusers carried as wheels in .whl/). Every stage runs under a timeout; the whole run stays under
# 8 minutes. Writes into OUTDIR five files and one folder:
#   tests.log  bench.log  torch.log  summary.json  summary.md  json/ (each stage's JSON)
# summary.json holds every stage's JSON (benches, profile, restore, baselines);
# scripts/benchmarks-md.py turns it into the GPU section of docs/BENCHMARKS.md.
# Prints a short table last.
#
#   scripts/device-check.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/device-check.sh OUTDIR}"
mkdir -p "$OUT"
# The prebuilt binaries travel packed (scripts/build-device-bundle.sh): unpack them first.
if [[ -f dist/bundle.tar.xz ]]; then
  python3 -c '
import tarfile
t = tarfile.open("dist/bundle.tar.xz")
try:
    t.extractall("dist", filter="data")
except TypeError:  # Python without extraction filters
    t.extractall("dist")' \
    || { echo "error: dist/bundle.tar.xz: cannot unpack" >&2; exit 1; }
fi
J="$OUT/json"             # per-stage JSON, folded into summary.json at the end; kept in
rm -rf "$J"               # OUTDIR so that a run cut short still returns what it measured
mkdir -p "$J"             # (emptied first: a reused OUTDIR must not report an old run)
START=$(date +%s)
BUDGET=${DPIR_CHECK_BUDGET:-450}   # seconds for all stages (the table takes a few more)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# stage NAME LIMIT LOG CMD...: runs CMD under min(LIMIT, time left), appends to LOG, records rc.
declare -A RC
stage() {
  local name="$1" limit="$2" log="$3"; shift 3
  local l; l=$(left)
  if (( l < 15 )); then echo "== $name: skipped (time budget spent)" | tee -a "$log"; RC[$name]=skip; return; fi
  (( limit > l )) && limit=$l
  echo "== $name (timeout ${limit}s): $*" >> "$log"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  RC[$name]=$rc
  echo "== $name: rc $rc in $(( $(date +%s) - t0 ))s" | tee -a "$log"
}

# CUDA libraries (cuBLASLt, NVRTC; cuBLAS, cuRAND for the candle baseline) for the binaries: look where the
# CUDA toolkit and PyTorch's wheels keep them.
libdirs=()
pysite=$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null || true)
for d in "$pysite/nvidia/cu13/lib" "$pysite/nvidia/cublas/lib" "$pysite/nvidia/cuda_nvrtc/lib" \
         /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [[ -n "$(ls "$d"/libcublasLt.so* "$d"/libnvrtc.so* 2>/dev/null)" ]] && libdirs+=("$d")
done
if (( ${#libdirs[@]} == 0 )); then
  f=$(timeout 20 find /usr /opt -name 'libcublasLt.so*' 2>/dev/null | head -n 1)
  [[ -n "$f" ]] && libdirs+=("$(dirname "$f")")
fi
LIBPATH=$(IFS=:; echo "${libdirs[*]:-}")
export LD_LIBRARY_PATH="${LIBPATH}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "bundle: $(if [[ -f dist/bin/BUNDLE_COMMIT ]]; then tr '\n' ' ' < dist/bin/BUNDLE_COMMIT; else echo unknown; fi)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2
  echo "CUDA library dirs: ${LIBPATH:-none found}"
  ls -la dist/bin 2>&1
} > "$OUT/tests.log"

if [[ -x dist/bin/cuda_kernels ]]; then
  stage kernels 60 "$OUT/tests.log" dist/bin/cuda_kernels --nocapture --test-threads=1
else echo "== kernels: missing dist/bin/cuda_kernels" | tee -a "$OUT/tests.log"; RC[kernels]=missing; fi
for t in mmdit:100 vae:60 clip:90 restore:90; do
  name=${t%%:*}; limit=${t##*:}
  if [[ -x dist/bin/cuda_$name ]]; then
    stage "$name" "$limit" "$OUT/tests.log" dist/bin/cuda_$name --nocapture --test-threads=1
  else echo "== $name: missing dist/bin/cuda_$name" | tee -a "$OUT/tests.log"; RC[$name]=missing; fi
done
# Standalone kernel checks built by other scripts (attention_check, vae_check, ...).
found_check=0
for chk in dist/bin/*_check; do
  [[ -x "$chk" ]] || continue
  found_check=1
  stage "$(basename "$chk")" 40 "$OUT/tests.log" "$chk"
done
(( found_check )) || echo "== *_check: none bundled" >> "$OUT/tests.log"

: > "$OUT/bench.log"
if [[ -x dist/bin/dpir ]]; then
  stage bench_sd3 120 "$OUT/bench.log" dist/bin/dpir bench --device cuda --config sd3-medium-1024 --json "$J/bench.json"
else echo "== bench: missing dist/bin/dpir" | tee -a "$OUT/bench.log"; RC[bench_sd3]=missing; fi

: > "$OUT/torch.log"
site=/tmp/dpir-site
if ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl >> "$OUT/torch.log" 2>&1; then
  stage torch 120 "$OUT/torch.log" env PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" \
    python3 scripts/baselines/torch_sd3_step.py --config sd3-medium-1024 --json "$J/torch.json"
else
  echo "skipped: diffusers wheels missing or not installable (.whl/)" | tee -a "$OUT/torch.log"; RC[torch]=skip
fi

if [[ -x dist/bin/candle_mmdit_cuda ]]; then
  stage candle_cuda 120 "$OUT/bench.log" dist/bin/candle_mmdit_cuda --config sd3-medium-1024 --warmup 3 --reps 10 --json "$J/candle_cuda.json"
else echo "== candle_cuda: missing dist/bin/candle_mmdit_cuda" | tee -a "$OUT/bench.log"; RC[candle_cuda]=missing; fi

if [[ -x dist/bin/dpir ]]; then
  stage bench_sd35 90 "$OUT/bench.log" dist/bin/dpir bench --device cuda --config sd35-medium-1024 --reps 5 --json "$J/bench_sd35.json"
  stage profile_sd3 60 "$OUT/bench.log" dist/bin/dpir profile --config sd3-medium-1024 --json "$J/profile.json"
  stage restore_gpu 60 "$OUT/bench.log" dist/bin/dpir bench --device cuda --config dpir-tiny-512 --reps 3 --model models/dpir-tiny --json "$J/restore_gpu.json"
  stage restore_gpu_1024 60 "$OUT/bench.log" dist/bin/dpir bench --device cuda --config dpir-tiny-1024 --reps 2 --model models/dpir-tiny --json "$J/restore_gpu_1024.json"
  stage restore_sd3_512 90 "$OUT/bench.log" dist/bin/dpir bench --device cuda --config dpir-sd3-512 --reps 2 --json "$J/restore_sd3_512.json"
  stage restore_sd3_1024 90 "$OUT/bench.log" dist/bin/dpir bench --device cuda --config dpir-sd3-1024 --reps 1 --json "$J/restore_sd3_1024.json"
fi

# Last, with whatever budget is left: PyTorch with torch.compile (compiling takes minutes).
if [[ -s "$J/torch.json" ]]; then
  stage torch_compile 150 "$OUT/torch.log" env PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" \
    python3 scripts/baselines/torch_sd3_step.py --config sd3-medium-1024 --reps 5 --compile --json "$J/torch_compile.json"
fi

rcs=""
for k in "${!RC[@]}"; do rcs+="$k=${RC[$k]} "; done
timeout 30 python3 - "$OUT" "$rcs" "$(( $(date +%s) - START ))" "$J" <<'PY'
import json, os, re, sys
out, rcs, elapsed, jdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def read(p):
    try:
        return open(os.path.join(out, p), errors="replace").read()
    except OSError:
        return ""
def load(p):
    try:
        return json.load(open(os.path.join(jdir, p)))
    except (OSError, ValueError):
        return None
tests = read("tests.log")
passes = re.findall(r"^PASS (.*)$", tests, re.M)
fails = re.findall(r"^FAIL (.*)$", tests, re.M)
skips = re.findall(r"skipped: .*", tests)
bench, b35, torch = load("bench.json"), load("bench_sd35.json"), load("torch.json")
profile, restore_gpu, candle = load("profile.json"), load("restore_gpu.json"), load("candle_cuda.json")
restore_gpu_1024 = load("restore_gpu_1024.json")
torch_compile = load("torch_compile.json")
if torch and torch_compile and torch_compile.get("compiled_step_ms"):
    torch["compiled_step_ms"] = torch_compile["compiled_step_ms"]
restore_sd3 = [load("restore_sd3_512.json"), load("restore_sd3_1024.json")]
head = tests.splitlines()[:4]
summary = {"header": head, "stage_rc": dict(kv.split("=", 1) for kv in rcs.split()), "elapsed_s": elapsed,
           "tests": {"pass": len(passes), "fail": len(fails), "failed": fails, "skipped": skips},
           "bench_sd3": bench, "bench_sd35": b35, "torch": torch, "profile_sd3": profile,
           "restore_gpu": restore_gpu, "restore_gpu_1024": restore_gpu_1024,
           "restore_sd3_512": restore_sd3[0], "restore_sd3_1024": restore_sd3[1], "candle_cuda": candle}
if bench and torch and bench.get("step_ms") and torch.get("eager_step_ms"):
    summary["speedup_vs_torch_eager"] = torch["eager_step_ms"] / bench["step_ms"]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
rows = [("stages (rc)", rcs.strip()), ("elapsed", f"{elapsed} s"),
        ("kernel/model checks", f"{len(passes)} PASS, {len(fails)} FAIL" + (f", {len(skips)} skipped" if skips else ""))]
for f in fails[:8]:
    rows.append(("  FAIL", f[:90]))
def op(b, key):
    for o in (b or {}).get("ops", []):
        if o["op"].startswith(key):
            return o
if bench:
    c = bench.get("ceilings", {})
    rows.append(("device", f"{bench.get('device')} sm_{bench.get('sm')}"))
    rows.append(("ceilings", f"GEMM {c.get('gemm_tflops', 0):.0f} TFLOP/s, copy {c.get('copy_gbs', 0):.0f} GB/s"))
    a = op(bench, "joint flash attention")
    if a:
        rows.append(("joint attention (ours)", f"{a['ms']:.3f} ms, {a['tflops']:.0f} TFLOP/s"))
    rows.append(("SD3-medium step (ours)", f"{bench['step_ms']:.2f} ms ({bench['step_tflops']:.0f} TFLOP/s, floor {bench['flop_floor_ms']:.1f} ms), fused attn {bench.get('fused_attention')}, allocs in loop {bench.get('allocations_in_loop')}"))
if b35:
    rows.append(("SD3.5-medium step (ours)", f"{b35['step_ms']:.2f} ms"))
if torch:
    rows.append(("SD3-medium step (PyTorch eager)", f"{torch['eager_step_ms']:.2f} ms, SDPA {torch.get('sdpa_ms', 0):.3f} ms ({torch.get('sdpa_tflops', 0):.0f} TFLOP/s)"))
    if torch.get("compiled_step_ms"):
        rows.append(("SD3-medium step (PyTorch torch.compile)", f"{torch['compiled_step_ms']:.2f} ms"))
if candle and candle.get("step_ms"):
    rows.append(("SD3-medium step (candle CUDA)", f"{candle['step_ms']:.2f} ms ({candle.get('dtype', '?')})"))
if restore_gpu:
    rows.append(("dpir-tiny restore 128->512 (GPU)", f"{restore_gpu['total_ms']:.1f} ms per image"))
if restore_gpu_1024:
    rows.append(("dpir-tiny restore 256->1024 (GPU)", f"{restore_gpu_1024['total_ms']:.1f} ms per image"))
for r in restore_sd3:
    if r:
        rows.append((f"DPIR SD3-size restore {r['input'][0]}->{r['output'][0]}, {r['steps_run']} steps (GPU)", f"{r['total_ms']:.0f} ms per image"))
if "speedup_vs_torch_eager" in summary:
    rows.append(("speedup vs PyTorch eager", f"{summary['speedup_vs_torch_eager']:.2f}x"))
md = ["# dpir device check", "", *[f"    {h}" for h in head], "", "| item | value |", "|---|---|"]
md += [f"| {k} | {v} |" for k, v in rows]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
w = max(len(k) for k, _ in rows)
print()
for k, v in rows:
    print(f"{k:<{w}}  {v}")
PY
