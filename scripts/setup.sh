#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with the CPU build of torch and everything else,
# plus Debian's Chromium for the browser tests (skipped where apt-get is unavailable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# setuptools >= 77 reads pyproject's SPDX license; a new venv of Python 3.11 comes with 65.
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" >/dev/null
.venv/bin/python -m pip install -q -r requirements.txt
# The project itself, editable: the `pixsigma` command and the prompt-expander entry points.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
# A clone imports its train/ and shapes/ by their folder names (pixsigma/layout.py; the wheel has them as
# pixsigma.train and pixsigma.shapes): the checkout on this venv's path lets `python -m train` run from anywhere.
pwd > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/pixsigma-checkout.pth"
if ! [ -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; browser tests will be skipped" >&2
fi
