#!/usr/bin/env bash
# Sets up a fresh environment and runs the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
# Faster XLA on CPU (see nanogptoss_jax/cpu_malloc.py).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=17179869184}
python -m pytest "$@"
