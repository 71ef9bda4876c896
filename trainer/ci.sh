#!/usr/bin/env bash
# Trainer tests for CI: installs PyTorch (CPU use of PyPI's wheel), numpy, safetensors and
# Pillow into a virtual environment under target/ (kept between runs), then runs
# trainer/tests. PYTHON may name an interpreter that already has them; that skips the install.
#   bash trainer/ci.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    venv=target/trainer-venv
    if ! "$venv/bin/python" -c "import torch, numpy, safetensors, PIL" 2>/dev/null; then
        echo "trainer/ci.sh: installing torch 2.11.0 into $venv (about 3 GB, once)"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            torch==2.11.0 numpy safetensors pillow
    fi
    PYTHON="$venv/bin/python"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$PYTHON" -m trainer.tests.run_all
