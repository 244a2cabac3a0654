#!/bin/sh
# The base every splitserve service image shares (services/*/Dockerfile run this same step on the same inputs, so
# the five images reuse one cached layer): install torch, then splitserve from the copied sources, then add the
# non-root user the services run as.
set -eu
SRC=/opt/splitserve/src
# CUDA torch from PyPI by default (prefill/decode need it); set the TORCH_INDEX_URL build arg to a CPU wheel index
# for smaller CPU-only images.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install --no-cache-dir --disable-pip-version-check --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
    python -m pip install --no-cache-dir --disable-pip-version-check "$TORCH_SPEC"
fi
python -m pip install --no-cache-dir --disable-pip-version-check "$SRC"
rm -rf "$SRC"
groupadd --system --gid 10001 splitserve
useradd --system --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin splitserve
# The demo model and the Hugging Face cache are written under the user's home.
mkdir -p /home/splitserve/.cache && chown -R splitserve:splitserve /home/splitserve
