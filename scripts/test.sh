#!/usr/bin/env bash
# The test command (README): sets up on first use, then runs the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
# no venv yet, or one made before the project became installable (no `pixsigma` command): set up
[ -x .venv/bin/python ] && [ -x .venv/bin/pixsigma ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Tiny models: one BLAS thread per process avoids oversubscribing the cores when tests spawn processes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q "$@"
