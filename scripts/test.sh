#!/usr/bin/env bash
# The test command (README): every test of the workspace. GPU tests report themselves
# skipped when no CUDA driver is present.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
