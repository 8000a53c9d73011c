#!/usr/bin/env bash
# Regenerates ensemble_serving/protocol/*_pb2*.py from protos/.
# The .proto files sit under protos/ensemble_serving/protocol/ so that the generated
# modules import each other by their package path (ensemble_serving.protocol...).
# Needs grpcio-tools (the "test" extra). tests/test_protocol.py checks the committed
# files are up to date.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python -m grpc_tools.protoc -I "$here" \
  --python_out="$root" --pyi_out="$root" --grpc_python_out="$root" \
  "$here"/ensemble_serving/protocol/model_config.proto \
  "$here"/ensemble_serving/protocol/grpc_service.proto
