#!/usr/bin/env bash
# Regenerates the Python gRPC stubs (package splitserve.v1) from protos/. Run it after editing any .proto
# and check the result in; tests/protos/test_protos.py fails while the checked-in stubs are stale.
#
#   scripts/gen_protos.sh             # writes shared/splitserve/v1/*_pb2{,_grpc}.py and *_pb2.pyi
#   scripts/gen_protos.sh OUT_DIR     # writes the same tree under OUT_DIR instead (used by the test)
#
# Needs grpcio-tools in the interpreter given by $PYTHON (default: .venv/bin/python, else python3).
# The stubs embed the grpcio-tools/protobuf versions that generated them, so regenerate with the version
# pinned for development (see pyproject.toml) to keep diffs small.
#
# Layout: protos/splitserve/v1/x.proto (proto package splitserve.v1) generates splitserve/v1/x_pb2.py, whose
# imports read `from splitserve.v1 import ...`: protoc writes them under shared/, where the package
# `splitserve` lives, so they are imported from where they are written, unchanged.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/shared}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi

mkdir -p "$out/splitserve/v1"
# Drop old outputs so a deleted .proto does not leave a stale module behind.
rm -f "$out"/splitserve/v1/*_pb2.py "$out"/splitserve/v1/*_pb2_grpc.py "$out"/splitserve/v1/*_pb2.pyi

cd "$repo/protos"
# Sorted, relative paths: the output must not depend on the caller's directory or filesystem order.
mapfile -t protos < <(find splitserve -name '*.proto' | LC_ALL=C sort)
"$PYTHON" -m grpc_tools.protoc -I . \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "${protos[@]}"
