#!/usr/bin/env bash
# Sets up a fresh environment from the lock and runs the test suite on both cores:
# bash scripts/test.sh [pytest args]   (e.g. -n 0 for one process, -k NAME for some tests)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. "${VENV:-.venv}/bin/activate"
# Faster XLA on CPU (see nanogptoss_jax/cpu_malloc.py).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-$(python -c "from nanogptoss_jax.cpu_malloc import TUNABLES; print(TUNABLES)")}
# Two workers; the tests of one file stay on one worker (loadfile), so a module's trained run,
# compiled functions and servers are made once.
python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
