#!/usr/bin/env bash
# The GPU figures of the throughput issue, on a lent device machine, once onnxruntime-gpu and the
# gateway's wheels are installed there (../shared/tools/gpu/README.md: /tmp/site-ort and /tmp/site):
# the defense core, separate sessions against one fused graph per member, batch 1024, host I/O, with
# the decisions on 10,000 test images compared with the CPU's.
#   usage: scripts/gpu_throughput.sh DATA_DIR OUT_DIR
set -uo pipefail
data=$1; out=$2
export PYTHONPATH=/tmp/site-ort:/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' | tee -a "$out/gpu.txt"
timeout 280 python3 -m bench.core_throughput --data-dir "$data" --device cuda --batch 1024 --seconds 5 \
    --bundle models/mnist models/cifar10 --check 10000 --out "$out/core-throughput-cuda.json" \
    2>&1 | tee "$out/core-throughput-cuda.log"
