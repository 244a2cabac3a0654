#!/usr/bin/env bash
# Installs splitserve and everything it needs into ./.venv (Debian, Python 3.11; runs again safely).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# System packages: a real Redis for `splitserve up` and the tests; docker-compose (v1, client only) so the tests can
# parse docker-compose.yml on machines without a Docker engine.
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${need[@]}" >/dev/null
fi
# CPU build by default; on a GPU machine set SPLITSERVE_TORCH=torch (or a CUDA wheel spec) before running.
TORCH_SPEC=${SPLITSERVE_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
echo "splitserve installed in $(pwd)/.venv"
