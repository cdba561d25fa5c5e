#!/usr/bin/env bash
# Regenerates requirements/lock.txt (Python 3.11, Linux x86_64) from pyproject.toml with uv:
# bash scripts/lock.sh [uv pip compile args, e.g. --upgrade-package jax]
# torch resolves against its CPU build (TORCH_FIND_LINKS), so no CUDA packages enter the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-${PIP_FIND_LINKS:-https://download.pytorch.org/whl/torch/}}
.venv/bin/python -m pip install --quiet uv
# The lock keeps its pins as preferences: give torch its CPU label back first, or the unlabeled
# pin would resolve to PyPI's CUDA build and pull its nvidia-* packages into the lock.
sed -i 's/^torch==\([0-9.]*\)$/torch==\1+cpu/' requirements/lock.txt
.venv/bin/python -m uv pip compile pyproject.toml --extra test --extra wandb \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "$TORCH_FIND_LINKS" -c requirements/torch.txt \
  --custom-compile-command "bash scripts/lock.sh" -o requirements/lock.txt --quiet "$@"
# The CPU build's local label would refuse PyPI's build of the same release.
sed -i 's/^torch==\([0-9.]*\)+cpu$/torch==\1/' requirements/lock.txt
