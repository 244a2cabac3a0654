#!/usr/bin/env bash
# Installs splitserve and everything it needs into ./.venv (Debian, Python 3.11; runs again safely).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# CPU build by default; on a GPU machine set SPLITSERVE_TORCH=torch (or a CUDA wheel spec) before running.
TORCH_SPEC=${SPLITSERVE_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
echo "splitserve installed in $(pwd)/.venv"
