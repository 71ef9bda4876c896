#!/usr/bin/env bash
# Train dpir-tiny on a GPU machine, from the repository root, within a wall-clock budget:
#
#   bash trainer/device_train.sh OUT MINUTES [INIT_DIR] [SPLIT]
#
# Needs: python3 with torch (+ safetensors, numpy, Pillow), the training photos in
# dist/train-data/ (scripts/prepare-train-data.sh; its dist/train-data-val/ enables a
# PSNR check at the end). Optional: dist/bin/dpir, or dist/bundle.tar.xz holding it
# (scripts/build-device-bundle.sh), to make Real-ESRGAN-style LQ/HQ pairs in the background;
# without it the trainer uses its on-device stand-in degradation.
# Carry: dist/bundle.tar.xz dist/train-data dist/train-data-val (about 19 MB; with the
# 43 MB tracked tree, under the 64 MiB that travels).
# INIT_DIR: continue from exported model files (e.g. models/dpir-tiny) instead of scratch.
# SPLIT: budget shares of the stages vae,robust,dit (default 0.35,0.15,0.5; with INIT_DIR
# 0.15,0.1,0.75). TRAIN_ARGS: more trainer flags. The bundled model's weakest part is its
# VAE decoder (colour dots, ~24 dB reconstruction); fine-tuning the decoder alone keeps the
# latent space, so the MMDiT and robust encoder stay valid:
#   TRAIN_ARGS="--stage vae --vae-decoder-only" bash trainer/device_train.sh OUT 6 models/dpir-tiny
#
# Writes into OUT (flat, 7 files): mmdit.safetensors, vae.safetensors,
# clip_vision.safetensors, dpir.safetensors (f16, refreshed every minute while training),
# train.log, losses.json, device_train.log. Exits 0 before MINUTES are up.
set -u
out="${1:?usage: device_train.sh OUT MINUTES [INIT_DIR] [SPLIT]}"
minutes="${2:?usage: device_train.sh OUT MINUTES [INIT_DIR] [SPLIT]}"
init="${3:-}"
split="${4:-}"
start=$(date +%s)
end=$(python3 -c "print(int($start + float('$minutes') * 60))") || end=$((start + 60))
mkdir -p "$out" && out=$(cd "$out" && pwd)
[[ -n "$init" && -d "$init" ]] && init=$(cd "$init" && pwd)
cd "$(dirname "$0")/.." || exit 1
log="$out/device_train.log"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

data=dist/train-data
work="${DPIR_TRAIN_WORK:-/tmp/dpir-train}"
pairs_root="$work/pairs"
mkdir -p "$work" "$pairs_root"
say "device_train: budget ${minutes} min, out $out, work $work"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
python3 -c "import torch, safetensors; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$log"
if [[ ! -d "$data" ]] || [[ -z "$(ls -A "$data" 2>/dev/null)" ]]; then
    say "error: no training photos in $data (run scripts/prepare-train-data.sh first)"
    exit 1
fi
say "photos: $(ls "$data" | wc -l) files, $(du -sh "$data" | cut -f1)"

# -- LQ/HQ pairs in the background -------------------------------------------------------
pids=()
pair_dirs=()
dpir=dist/bin/dpir
if [[ ! -x "$dpir" && -f dist/bundle.tar.xz ]]; then
    # The device bundle (scripts/build-device-bundle.sh) carries the CLI packed.
    python3 -c 'import tarfile; tarfile.open("dist/bundle.tar.xz").extract("bin/dpir", "dist")' \
        2>>"$log" || say "warning: could not unpack bin/dpir from dist/bundle.tar.xz"
fi
if [[ -x "$dpir" ]]; then
    # 512 px HQ regions: the trainer cuts the 256 px local crop inside and uses the whole
    # region's LQ as the global view. Half standard, half light preset.
    # Rounds of growing size: `dpir degrade` skips the pairs already written and spreads
    # each round over all photos, so whatever exists when training reads it is varied.
    for preset in standard light; do
        d="$pairs_root/$preset"
        mkdir -p "$d"
        seed=1; [[ $preset == light ]] && seed=2
        (
            for n in 256 1024 3072 8192 20000; do
                nice -n 10 "$dpir" degrade --pairs "$n" --crop 512 --downscale 1 \
                    --preset "$preset" --scale 4 --seed "$seed" "$data" -o "$d" || exit 1
            done
        ) >>"$work/degrade-$preset.log" 2>&1 &
        pids+=($!)
        pair_dirs+=("$d")
        say "pairs: dpir degrade ($preset) started, pid $!"
    done
    sleep 3
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null && [[ -z "$(ls -A "${pair_dirs[$i]}/lq" 2>/dev/null)" ]]; then
            say "pairs: dpir degrade stopped early: $(tail -n 2 "$work/degrade-"*.log 2>/dev/null | tr '\n' ' ')"
        fi
    done
else
    say "pairs: $dpir not found; the trainer degrades on the device instead"
fi
pairs_arg=()
if [[ ${#pair_dirs[@]} -gt 0 ]]; then
    pairs_arg=(--pairs "$(IFS=,; echo "${pair_dirs[*]}")")
fi

stop_pairs() {
    local p
    for p in "${pids[@]}"; do
        kill $(pgrep -P "$p" 2>/dev/null) "$p" 2>/dev/null
    done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    pids=()
}
trap 'stop_pairs' EXIT

# -- training ----------------------------------------------------------------------------
# The trainer stops 20 s before the end (final checkpoint, export, check, clean-up);
# `timeout` interrupts it 12 s before the end should it overrun (it then finishes its step,
# exports and exits) and kills it 7 s before the end.
now=$(date +%s)
until=$((end - 20))
secs=$((end - now - 12))
if (( secs < 20 )); then secs=20; until=$((now + 12)); fi
extra=()
if [[ -n "$init" ]]; then
    if [[ -d "$init" ]]; then
        extra+=(--init-from "$init")
        [[ -z "$split" ]] && split="0.15,0.1,0.75"
    else
        say "warning: INIT_DIR $init not found; training from scratch"
    fi
fi
[[ -n "$split" ]] && extra+=(--split "$split")
# More trainer flags, word-split on purpose (e.g. "--stage vae --vae-decoder-only").
# shellcheck disable=SC2206
[[ -n "${TRAIN_ARGS:-}" ]] && extra+=(${TRAIN_ARGS})
if [[ -d "$data-val" ]]; then
    extra+=(--val "$data-val")
else
    say "no $data-val: no end-of-run check"
fi
say "train: python3 -m trainer.train --until $until (in $((until - now)) s) ${pairs_arg[*]} ${extra[*]}"
PYTHONUNBUFFERED=1 timeout -s INT -k 5 "$secs" python3 -m trainer.train --data "$data" \
    "${pairs_arg[@]}" --out "$out" --work "$work/state" --until "$until" "${extra[@]}" \
    2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
say "train: exit code $rc"
stop_pairs
trap - EXIT
for preset in standard light; do
    d="$pairs_root/$preset/lq"
    [[ -d "$d" ]] && say "pairs made ($preset): $(ls "$d" | wc -l)"
done
ls -la "$out" | tee -a "$log"
say "device_train: done in $(( $(date +%s) - start )) s"
exit 0
