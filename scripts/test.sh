#!/usr/bin/env bash
# Sets up a fresh environment and runs the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
# Offline machines: tiktoken's BPE file from ../shared/tiktoken (tests copy it to a temp dir).
python -m pytest "$@"
