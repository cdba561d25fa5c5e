#!/usr/bin/env bash
# Sets up a fresh environment and runs the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
# Faster XLA on CPU (see nanogptoss_jax/cpu_malloc.py).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-$(python -c "from nanogptoss_jax.cpu_malloc import TUNABLES; print(TUNABLES)")}
python -m pytest "$@"
