#!/usr/bin/env bash
# Selection round 19 on a lent GPU machine (H100/H200, PyTorch preinstalled), in one call: three
# classifier-guided reformers trained long (a time-scheduled cosine decay, --schedule-minutes) on the JPEG
# training split and the 4,193 real uncompressed training originals, beside the full-strength Carlini
# L-infinity and L0 rows of models/cifar10 crafted in shards (--cache-shard) on the same GPU.
# docs/results/cifar10-selection-round19/README.md gives the candidates, the rule and the CPU half.
#   usage: scripts/gpu_round19.sh PAYLOAD OUT [MINUTES]
# PAYLOAD (carried, ignored by git): whl/ (pydantic and its needs for Python 3.12),
#   data/cifar10/cifar10-jpeg.tar.gz, orig-train.tar (runs/cifar10-originals/train as a tar).
# OUT gets one .tgz per training work dir (checkpoint, history, the training logits), carlini.tgz (the new
# cache chunks of both rows) and the logs.
set -uo pipefail
pay=$1; out=$2; minutes=${3:-6}
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$pay"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/orig && tar xf "$pay/orig-train.tar" -C /tmp/orig || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$out/gpu.txt"
runs=/tmp/r19; mkdir -p "$runs"
cap=$(( minutes * 60 + 150 ))   # hard stop: the schedule ends at MINUTES of training, after ~1 min of loading
train=(--data-dir "$pay/data" --device cuda --train-only --name cifar10 --candidate
       --init-from models/cifar10/reformer.onnx --originals /tmp/orig/train --batch-size 256 --lr 3e-4
       --steps 100000 --schedule-minutes "$minutes" --recon-fpr 0 --jsd-fpr 0 0.02)
c11mix=fgsm=3,pgd=1,preimage=1,original=2,fgsm_orig=1,pgd_orig=1
declare -A extra=(
  [c13]="--mix $c11mix --preimage-max 0.5"
  [c14]="--mix $c11mix --preimage-max 0.5 --quiet-weight 3 --quiet-rows preimage"
  [c15]="--mix fgsm=2,pgd=1,original=3,fgsm_orig=2,pgd_orig=1 --quiet-weight 3 --quiet-rows preimage"
)
for c in c13 c14 c15; do
  # shellcheck disable=SC2086
  ( OMP_NUM_THREADS=3 timeout "$cap" python3 -m training.build_guided "${train[@]}" --work-dir "$runs/$c" \
      --out "$runs/$c-bundle" ${extra[$c]} ) > "$runs/$c.log" 2>&1 &
done
# Carlini at full strength on models/cifar10, chunks as the CPU runs keep them (L-inf 10, L0 1 example)
ev=(--bundle models/cifar10 --data-dir "$pay/data" --device cuda --n-carlini 200 --kappas)
linf=docs/results/eval-cifar10-cw-linf-full/adv-cache; l0=docs/results/eval-cifar10-cw-l0-full/adv-cache
ccap=$(( cap - 30 ))
for i in 0 1 2; do
  ( OMP_NUM_THREADS=1 timeout "$ccap" python3 -m training.evaluate.run "${ev[@]}" --attacks carlini_linf \
      --cache $linf --cache-chunk 10 --cache-shard $i/3 --out "$runs/linf-$i" ) > "$runs/linf-$i.log" 2>&1 &
done
for i in 0 1 2 3; do
  ( OMP_NUM_THREADS=1 timeout "$ccap" python3 -m training.evaluate.run "${ev[@]}" --attacks carlini_l0 \
      --cache $l0 --cache-chunk 1 --cache-shard $i/4 --out "$runs/l0-$i" ) > "$runs/l0-$i.log" 2>&1 &
done
wait
echo "all jobs ended after $(( $(date +%s) - start )) s"
tail -n 4 "$runs"/*.log
for c in c13 c14 c15; do
  tar czf "$out/$c.tgz" -C "$runs" "$c"
done
# the chunks made here: files newer than the script's start
find $linf $l0 -name '*.npz' -newermt "@$start" > "$runs/new-chunks.txt"
echo "new chunks: $(grep -c linf "$runs/new-chunks.txt") L-inf, $(grep -c l0-full "$runs/new-chunks.txt") L0"
tar czf "$out/carlini.tgz" -T "$runs/new-chunks.txt"
tar czf "$out/logs.tgz" -C "$runs" $(cd "$runs" && ls ./*.log new-chunks.txt)
ls -la "$out"
