#!/usr/bin/env bash
# The GPU figures of the throughput issue, on a lent device machine, once onnxruntime-gpu and the
# gateway's wheels are installed there (../shared/tools/gpu/README.md: /tmp/site-ort and /tmp/site):
# the defense core, separate sessions against one fused graph per member, batch 1024, host I/O, with
# the decisions on 10,000 test images compared with the CPU's.
# The fused graphs need the onnx package there: if the image lacks it, put its wheel beside the others
# before the device calls (pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_17_x86_64 "onnx==$(.venv/bin/python -c 'import onnx; print(onnx.__version__)')").
#   usage: scripts/gpu_throughput.sh DATA_DIR OUT_DIR
set -uo pipefail
data=$1; out=$2
export PYTHONPATH=/tmp/site-ort:/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' | tee -a "$out/gpu.txt"
python3 -c 'import onnx; print("onnx", onnx.__version__)' | tee -a "$out/gpu.txt" || echo "no onnx: fused rows will fail"
timeout 280 python3 -m bench.core_throughput --data-dir "$data" --device cuda --batch 1024 --seconds 5 \
    --bundle models/mnist models/cifar10 --check 10000 --out "$out/core-throughput-cuda.json" \
    2>&1 | tee "$out/core-throughput-cuda.log"
