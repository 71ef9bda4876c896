#!/usr/bin/env bash
# Quality of the bundled model (dpir-tiny) against bicubic on the validation photos.
#
#   scripts/eval-val.sh [VAL_DIR] [WORK_DIR]
#
# VAL_DIR: the validation photos (default: ../shared/data/photos/val from the repo root).
# WORK_DIR: where crops and outputs go (default: a fresh temporary folder).
# Environment: PAIRS (crops per preset, default 8: one per photo), SEED (default 7),
# SETTINGS (space-separated steps/strength/cfg/color-fix tuples to run; "default" = the CLI's
# defaults), MODEL (a model folder; default: the bundled one).
#
# For each preset (light, standard): `dpir degrade --pairs` cuts fixed-seed 256×256 HQ crops
# (after a 2× antialiased downscale) and their 64×64 LQ; bicubic ×4 of the LQ and `dpir
# restore` ×4 (one 256-px tile) at each setting are scored with `dpir compare` (Y channel,
# 4-px border). Prints a markdown table (mean PSNR/SSIM, wall seconds per image) and the time
# of one 128→512 restore at the defaults.
set -euo pipefail
root="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
cd "$root"

val="${1:-../shared/data/photos/val}"
work="${2:-$(mktemp -d)}"
pairs="${PAIRS:-8}"
seed="${SEED:-7}"
settings="${SETTINGS:-default 4/1.0/4.0/wavelet 10/1.0/4.0/wavelet 4/0.6/1.0/wavelet 10/0.6/1.0/wavelet 20/0.6/1.0/wavelet 10/0.4/1.0/wavelet 10/0.6/1.0/none}"
model=()
[[ -n "${MODEL:-}" ]] && model=(--model "$MODEL")

[[ -d "$val" ]] || { echo "error: $val: validation photo folder not found" >&2; exit 1; }
cargo build --release -p dpir-cli >&2
dpir="$root/target/release/dpir"
mkdir -p "$work"

now() { date +%s.%N; }
# mean PSNR and SSIM of one `dpir compare --json` group
means() { jq -r '.groups[0] | "\(.mean_psnr // "inf") \(.mean_ssim)"'; }

echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with local changes)'), $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) threads"
echo "photos: $(find "$val" -maxdepth 1 -type f | wc -l), crops per preset: $pairs, seed: $seed"
echo
echo "| preset | method | steps | strength | cfg | color fix | PSNR (dB) | SSIM | s / image |"
echo "|---|---|---|---|---|---|---|---|---|"
for preset in light standard; do
  d="$work/$preset"
  "$dpir" degrade --pairs "$pairs" --crop 256 --downscale 2 --seed "$seed" \
    --preset "$preset" -o "$d" "$val" >&2
  read -r p s < <("$dpir" compare --json --border 4 --bicubic 4 "$d/hq" "$d/lq" | means)
  printf '| %s | bicubic | | | | | %.2f | %.4f | |\n' "$preset" "$p" "$s"
  for st in $settings; do
    if [[ "$st" == default ]]; then
      opts=(); label="default (CLI)"; cols="| | | |"
    else
      IFS=/ read -r steps strength cfg cf <<<"$st"
      opts=(--steps "$steps" --strength "$strength" --cfg "$cfg" --color-fix "$cf")
      label="dpir-tiny"; cols="$steps | $strength | $cfg | $cf |"
    fi
    out="$d/out-${st//\//_}"
    t0=$(now)
    "$dpir" restore "${model[@]}" "${opts[@]}" --overwrite "$d/lq" -o "$out" >/dev/null 2>&1
    t1=$(now)
    read -r p s < <("$dpir" compare --json --border 4 "$d/hq" "$out" | means)
    per=$(echo "($t1 - $t0) / $pairs" | bc -l)
    printf '| %s | %s | %s %.2f | %.4f | %.2f |\n' "$preset" "$label" "$cols" "$p" "$s" "$per"
  done
done

# Wall time of one 128→512 restore at the default settings (a 128×128 LQ made from a
# 512×512 HQ crop of the first photo).
big="$work/big"
"$dpir" degrade --pairs 1 --crop 512 --downscale 2 --seed "$seed" --preset light -o "$big" "$val" >&2
t0=$(now)
"$dpir" restore "${model[@]}" --overwrite "$big/lq" -o "$big/out" >/dev/null 2>&1
t1=$(now)
echo
printf '128→512 restore at the defaults: %.1f s wall\n' "$(echo "$t1 - $t0" | bc -l)"
