#!/usr/bin/env bash
# Train issue 30's ensemble members on a lent GPU machine, in one call of the device tool:
# five CIFAR-10 airbench members and five MNIST mnist_cnn members, each on the train split
# minus the 10 % validation split (--val-fraction 0.1, split seed 0) that the exporter's
# --weights fit later uses. The recipes are the CPU ones, unchanged.
#
# Here first:  python scripts/device/cifar_jpeg.py pack ../shared/data/cifar-10-batches-py .device/cifar
#              mkdir -p .device/data/MNIST && cp -r ../shared/data/MNIST/raw .device/data/MNIST/
# Then (device tool, carry [".device"]):  bash scripts/device/train_members.sh
# The run dirs come back under $OUT as one tar per member (checkpoint.pt left out).
#
# Settings: EPOCHS (recipe default when unset), CIFAR_SEEDS [0,1,2,3,4], MNIST_SEEDS [0,1,2,3,4],
# DEVICE [cuda], OUT [outputs/device].
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-outputs/device}
data=/tmp/ensemble-serving-data
runs=/tmp/ensemble-serving-runs
device=${DEVICE:-cuda}
epochs=(${EPOCHS:+--epochs "$EPOCHS"})
mkdir -p "$out" "$data/MNIST" "$runs"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

{ nvidia-smi -L; "$python" -c "import torch, onnx, onnxruntime; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"; } 2>&1 | tee "$out/environment.txt"
"$python" scripts/device/cifar_jpeg.py unpack .device/cifar "$data/cifar-10-batches-py" || exit 1
cp -r .device/data/MNIST/raw "$data/MNIST/"

train() {  # dataset arch seed
    "$python" -m trainer train --dataset "$1" --arch "$2" --seeds "$3" --val-fraction 0.1 --split-seed 0 \
        --data-dir "$data" --no-download --device "$device" --threads 2 --output-dir "$runs" "${epochs[@]}" \
        > "$runs/$1-s$3.log" 2>&1
    echo "$1 seed $3: exit $? after $SECONDS s"
}
# All members at once: each is far too small to fill the GPU alone.
for seed in ${CIFAR_SEEDS:-0 1 2 3 4}; do train cifar10 airbench "$seed" & done
for seed in ${MNIST_SEEDS:-0 1 2 3 4}; do train mnist mnist_cnn "$seed" & done
wait
tail -n 25 "$runs"/*.log > "$out/train-logs.txt"
for dir in "$runs"/cifar10-airbench-s*; do
    [ -d "$dir" ] && tar -C "$runs" --exclude checkpoint.pt -cf "$out/$(basename "$dir").tar" "$(basename "$dir")"
done
tar -C "$runs" --exclude checkpoint.pt -cf "$out/mnist-members.tar" $(cd "$runs" && ls -d mnist-mnist_cnn-s* ./*.log 2>/dev/null)
ls -la "$out"
