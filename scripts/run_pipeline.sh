#!/usr/bin/env bash
# The whole pipeline on one machine, end to end (the README's main-job command):
#
#   train a small MNIST ensemble (3 seeds)  ->  export it to ONNX with the parity check
#   ->  serve it (a local server process)  ->  client evaluate on the 10,000 test images
#   ->  check a member's served accuracy equals its trainer's  ->  stop the server.
#
# Usage:  scripts/run_pipeline.sh     (sets up .venv on first use: scripts/bootstrap.sh)
#
# Settings (environment variables):
#   ENSEMBLE_SERVING_DATA_DIR  data sets; default ../shared/data beside the repo when present,
#                              else ~/.cache/ensemble-serving/data (downloaded if absent)
#   PIPELINE_DIR               where runs, the model repository and the report go
#                              [outputs/pipeline]
#   PIPELINE_SEEDS             ensemble members' seeds [0,1,2]
#   PIPELINE_EPOCHS            epochs per member [2]
#   PIPELINE_MIN_ACCURACY      the served ensemble must reach this test accuracy [0.99]
#   GRPC_PORT, METRICS_PORT    server ports [8001, 8002, or free ports if those are taken]
#
# Exits non-zero as soon as a stage fails; the server is stopped (SIGTERM) in every case.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# .venv with the project and its console scripts (trainer, exporter, server, client) on PATH;
# created on first use (scripts/bootstrap.sh).
source "$repo_root/scripts/bootstrap.sh"
cd "$repo_root"
python_bin="python"

if [[ -z "${ENSEMBLE_SERVING_DATA_DIR:-}" && -d ../shared/data ]]; then
    ENSEMBLE_SERVING_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export ENSEMBLE_SERVING_DATA_DIR="${ENSEMBLE_SERVING_DATA_DIR:-$HOME/.cache/ensemble-serving/data}"
work="${PIPELINE_DIR:-outputs/pipeline}"
seeds="${PIPELINE_SEEDS:-0,1,2}"
epochs="${PIPELINE_EPOCHS:-2}"
min_accuracy="${PIPELINE_MIN_ACCURACY:-0.99}"
name="mnist"

stage() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
started_at=$SECONDS

# A port: the requested one, the default if free, else any free one.
pick_port() {
    "$python_bin" - "$1" <<'EOF'
import socket, sys
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port)); return s.getsockname()[1]
        except OSError:
            return None
print(free(int(sys.argv[1])) or free(0))
EOF
}
grpc_port="${GRPC_PORT:-$(pick_port 8001)}"
metrics_port="${METRICS_PORT:-$(pick_port 8002)}"
if [[ "$metrics_port" == "$grpc_port" ]]; then metrics_port="$(pick_port 0)"; fi
url="127.0.0.1:$grpc_port"

server_pid=""
stop_server() {  # SIGTERM, then wait: a clean shutdown exits 0
    local status=0
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        echo "stopping the server (SIGTERM to pid $server_pid)"
        kill -TERM "$server_pid"
        wait "$server_pid" || status=$?
        ((status == 0)) || echo "run_pipeline: the server exited with status $status; see $work/server.log" >&2
    fi
    server_pid=""
    return "$status"
}
trap 'stop_server || true' EXIT
trap 'exit 130' INT TERM

echo "data: $ENSEMBLE_SERVING_DATA_DIR   work dir: $work   seeds: $seeds   epochs: $epochs"
mkdir -p "$work"
rm -rf "$work/runs" "$work/model_repository" "$work/report" "$work/report-m0"  # this script's own outputs only

stage "1/5 train: MNIST ensemble, seeds $seeds, $epochs epochs each"
trainer train --dataset mnist --seeds "$seeds" --epochs "$epochs" --name "$name" \
    --output-dir "$work/runs" --data-dir "$ENSEMBLE_SERVING_DATA_DIR"
run_dirs=()
for seed in ${seeds//,/ }; do run_dirs+=("$work/runs/$name-s$seed"); done

stage "2/5 export: ONNX + parity check -> $work/model_repository"
exporter to-onnx "${run_dirs[@]}" --repository "$work/model_repository" --name "$name" \
    --data-dir "$ENSEMBLE_SERVING_DATA_DIR"

stage "3/5 serve: server on $url (metrics on :$metrics_port)"
server --model-repository "$work/model_repository" --host 127.0.0.1 \
    --grpc-port "$grpc_port" --metrics-port "$metrics_port" >"$work/server.log" 2>&1 &
server_pid=$!
deadline=$((SECONDS + 120))
until client status --url "$url" >/dev/null 2>&1; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "run_pipeline: the server exited before it was ready; its log:" >&2
        tail -n 20 "$work/server.log" >&2
        server_pid=""
        exit 1
    fi
    if ((SECONDS > deadline)); then
        echo "run_pipeline: the server was not ready within 120 s; see $work/server.log" >&2
        exit 1
    fi
    sleep 0.5
done
client status --url "$url"

stage "4/5 evaluate: the served ensemble '$name' on the 10,000 MNIST test images"
client evaluate --dataset mnist --url "$url" --model "$name" --out "$work/report"

stage "5/5 check: member m0 served = its trainer's test accuracy (within 0.05 points); ensemble >= $min_accuracy"
client evaluate --dataset mnist --url "$url" --model "$name-m0" --out "$work/report-m0" >/dev/null
"$python_bin" - "${run_dirs[0]}/config.json" "$work/report-m0/report.json" "$work/report/report.json" "$min_accuracy" <<'EOF'
import json, sys
trained = json.load(open(sys.argv[1]))["metrics"]["test_accuracy"]
served = json.load(open(sys.argv[2]))["accuracy"]
ensemble = json.load(open(sys.argv[3]))["accuracy"]
floor = float(sys.argv[4])
gap = abs(served - trained) * 100
print(f"member m0: trainer {100 * trained:.2f} %, served {100 * served:.2f} % (gap {gap:.3f} points)")
print(f"ensemble:  served {100 * ensemble:.2f} % (floor {100 * floor:.2f} %)")
if gap > 0.05:
    sys.exit(f"run_pipeline: served accuracy differs from the trainer's by {gap:.3f} points (> 0.05)")
if ensemble < floor:
    sys.exit(f"run_pipeline: the served ensemble reached {100 * ensemble:.2f} %, below {100 * floor:.2f} %")
EOF

stop_server
echo
echo "pipeline finished in $((SECONDS - started_at)) s; report: $work/report (report.json, per_class.csv, confusion_matrix.png)"
