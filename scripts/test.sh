#!/usr/bin/env bash
# The test command (README): every test target of the workspace (lib, bin, integration tests,
# benches in test mode). GPU tests pass as "skipped: no CUDA driver" when no driver is present;
# their output is shown (--show-output) and the skips are counted at the end, so a GPU-less run
# says plainly which GPU tests did not run.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

cargo test --workspace --all-targets -- --show-output 2>&1 | tee "$log"

skips="$(grep -E ': skipped: no (CUDA driver|usable CUDA device)' "$log" || true)"
echo
if [[ -n "$skips" ]]; then
  echo "GPU tests skipped: $(printf '%s\n' "$skips" | wc -l)"
  printf '%s\n' "$skips" | sed 's/^/  /'
else
  echo "GPU tests skipped: 0"
fi
