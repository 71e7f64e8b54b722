#!/usr/bin/env bash
# The training half of the CIFAR-10 bundle and of both pools, run on a lent GPU machine (H100/H200,
# PyTorch preinstalled) with --train-only; the bundles are then written on the CPU machine by the
# same commands without --train-only, which reuse the weights (see docs/results/).
#   usage: scripts/train_on_gpu.sh DATA_DIR WHEEL_DIR OUT_DIR
set -uo pipefail
data=$1; wheels=$2; out=$3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
runs=/tmp/runs; mkdir -p "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
common=(--data-dir "$data" --device cuda --train-only)
# three independent jobs share the GPU (small sigmoid autoencoders leave it mostly idle)
( time timeout 470 python3 -m training.build_cifar10 "${common[@]}" --work-dir $runs/cifar10 \
    --ae-max-minutes 4 ) > $runs/cifar10.log 2>&1 &
( time timeout 470 python3 -m training.build_pool "${common[@]}" --dataset cifar10 --base models/cifar10 \
    --work-dir $runs/cifar10-pool --pretrain-epochs 10 --epochs 200 --max-minutes 5 ) > $runs/cifar10-pool.log 2>&1 &
( time timeout 470 python3 -m training.build_pool "${common[@]}" --dataset mnist --base models/mnist \
    --work-dir $runs/mnist-pool --pretrain-epochs 10 --epochs 200 --max-minutes 5 ) > $runs/mnist-pool.log 2>&1 &
wait
tail -n 5 $runs/*.log
nvidia-smi --query-gpu=name --format=csv,noheader > $runs/gpu.txt
for job in cifar10 cifar10-pool mnist-pool; do
  cp $runs/$job.log "$out/" ; tar czf "$out/$job.tgz" -C $runs $job
done
ls -la "$out"
