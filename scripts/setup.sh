#!/usr/bin/env bash
# Creates .venv and installs nanogptoss-jax into it at the versions of requirements/lock.txt.
# Usage: bash scripts/setup.sh [test]
# With "test": also the test and wandb extras and OpenAI's reference implementation (the torch
# oracle). VENV=DIR and PYTHON=python3.12 pick another folder and interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "test" ]; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    # e.g. https://download.pytorch.org/whl/cpu: PyPI's Linux torch wheel is the multi-GB CUDA one.
    python -m pip install --quiet torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  fi
  python -m pip install --quiet -c requirements/lock.txt -e ".[test,wandb]"
  # gpt-oss 0.0.9 declares Python >= 3.12 and heavy serving deps; its torch model needs neither.
  python -m pip install --quiet --no-deps --ignore-requires-python gpt-oss==0.0.9
else
  python -m pip install --quiet -c requirements/lock.txt -e .
fi
