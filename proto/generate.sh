#!/usr/bin/env bash
# Regenerates the committed gRPC code beside the .proto sources. Usage: proto/generate.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
python=${PYTHON:-python}
"$python" -m grpc_tools.protoc -I "$here" --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  "$here"/fedsilo/v1/*.proto
