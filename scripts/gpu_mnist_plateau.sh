#!/usr/bin/env bash
# The MNIST autoencoders trained further, towards a plateau, on a lent GPU machine (H100/H200, PyTorch
# preinstalled): AE-I and AE-II start from models/mnist's (trained to the 400-epoch cap on the CPU, still
# improving: docs/results/mnist-bundle.md) and train side by side, each until its learning rate, halved
# after every 10 epochs without a better validation denoising MSE, would fall below 1e-5 (converged), or
# CAP_MIN minutes are spent, whichever comes first (same recipe otherwise: denoising noise 0.1, Adam from
# 1e-3 — restarted, the optimizer state is not in the bundle — batch 256). The same flags as the CPU run.
#   usage: scripts/gpu_mnist_plateau.sh DATA_DIR WHEEL_DIR OUT_DIR    (DEVICE=cpu CAP_MIN=0.02: a smoke run)
# DATA_DIR: a carried folder holding mnist/ (the IDX files). OUT gets work.tgz (weights, histories,
# checkpoints) and the logs. Then, here on the CPU, the bundle from those weights (nothing retrained):
#   tar xzf OUT/work.tgz -C runs && magnet train mnist --data-dir ../shared/data --work-dir runs/mnist-plateau \
#       --out runs/mnist-plateau-bundle --classifier-from models/mnist/classifier.onnx
# and the MNIST rows measured again on it with the cached adversarial examples (magnet evaluate --cache).
set -uo pipefail
data=$1; wheels=$2; out=$3
cap=${CAP_MIN:-8}
if ls "$wheels"/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
work=/tmp/mnist-plateau; mkdir -p "$work" "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
common=(--data-dir "$data" --device "${DEVICE:-cuda}" --work-dir "$work" --out /tmp/unused --train-only
        --classifier-from models/mnist/classifier.onnx --ae-init-from models/mnist
        --ae-epochs 100000 --ae-patience 100 --ae-lr-decay 0.5 --ae-lr-patience 10 --ae-min-lr 1e-5
        --ae-max-minutes "$cap")
python3 -m training.build_mnist "${common[@]}" --autoencoders ae_i > "$out/ae_i.log" 2>&1 &
sleep 20  # the classifier stage (weights from the ONNX file) written once, by the first process
python3 -m training.build_mnist "${common[@]}" --autoencoders ae_ii > "$out/ae_ii.log" 2>&1 &
wait
tail -n 3 "$out"/ae_*.log
tar czf "$out/work.tgz" -C /tmp mnist-plateau
ls -la "$out"
