#!/usr/bin/env bash
# Fine-tune dpir-tiny on a CPU-only machine (the project's 2-core development machines),
# within a wall-clock budget, from the repository root:
#
#   bash trainer/cpu_train.sh OUT MINUTES [INIT_DIR]
#
# A CPU cannot afford the MMDiT stage (2.6 s per 256² sample, trainer/README.md), but the
# bundled model's weakest part, its VAE decoder, trains at ~0.25 s per 128² sample. So by
# default this runs the decoder-only VAE stage (`--vae-decoder-only`: frozen encoders, the
# latent space and with it the MMDiT stay valid) from INIT_DIR (default models/dpir-tiny),
# on 128² crops: half the steps decode the frozen VAE encoder's latents of HQ crops, half the
# robust encoder's latents of their LQ images (what `dpir restore` decodes), L1 + L2.
#
# Needs: python3 with torch, safetensors, numpy, Pillow (PYTHON=...), the training photos in
# dist/train-data/ (scripts/prepare-train-data.sh), and a release `dpir` (built if missing)
# for the LQ/HQ pairs: PAIRS (default 3000) per preset (light and standard), 256² HQ, ×4,
# fixed seeds, made once into WORK/pairs-*.
# WORK (default /tmp/dpir-cpu-train, env DPIR_TRAIN_WORK) keeps the pairs and the trainer's
# checkpoint (every 60 s): running the same command again resumes from it; remove WORK to
# start over from INIT_DIR. TRAIN_ARGS replaces the stage flags below; THREADS sets
# OMP_NUM_THREADS (default: all cores).
#
# Writes into OUT: the four model files (refreshed every minute), train.log, losses.json.
# Evaluate them with `MODEL=OUT scripts/eval-val.sh`, and copy them into models/dpir-tiny
# only if they beat the bundled model there.
set -euo pipefail
out="${1:?usage: cpu_train.sh OUT MINUTES [INIT_DIR]}"
minutes="${2:?usage: cpu_train.sh OUT MINUTES [INIT_DIR]}"
init="${3:-models/dpir-tiny}"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
work="${DPIR_TRAIN_WORK:-/tmp/dpir-cpu-train}"
pairs="${PAIRS:-3000}"
data=dist/train-data
[[ -d "$data" ]] || { echo "error: no training photos in $data (run scripts/prepare-train-data.sh first)" >&2; exit 1; }
[[ -d "$init" ]] || { echo "error: INIT_DIR $init not found" >&2; exit 1; }
until=$(( $(date +%s) + ${minutes%.*} * 60 ))
mkdir -p "$out" "$work"

dpir=target/release/dpir
[[ -x "$dpir" ]] || cargo build --release -p dpir-cli
dirs=()
for preset in light standard; do
    seed=101; [[ $preset == standard ]] && seed=202
    d="$work/pairs-$preset"
    # Skips the pairs already written: a rerun costs nothing. Its progress (stderr) goes to a
    # log, shown only if it fails; the summary line (stdout) is printed.
    if ! "$dpir" degrade --pairs "$pairs" --crop 256 --downscale 1 --preset "$preset" --scale 4 \
        --seed "$seed" -o "$d" "$data" 2>"$work/degrade-$preset.log"; then
        cat "$work/degrade-$preset.log" >&2
        exit 1
    fi
    dirs+=("$d")
done

# shellcheck disable=SC2206  # word-split on purpose
args=(${TRAIN_ARGS:---stage vae --vae-decoder-only --crop 128 --batch-vae 6 --lr-vae 2e-4})
echo "cpu_train: until $(date -d "@$until" '+%H:%M'), out $out, work $work, ${args[*]}"
OMP_NUM_THREADS="${THREADS:-$(nproc)}" PYTHONPATH=. PYTHONUNBUFFERED=1 "$py" -m trainer.train \
    --data "$data" --pairs "$(IFS=,; echo "${dirs[*]}")" --out "$out" --work "$work/state" \
    --init-from "$init" --until "$until" "${args[@]}"
