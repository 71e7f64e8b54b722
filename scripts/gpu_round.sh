#!/usr/bin/env bash
# A selection round on a lent GPU machine (H100/H200, PyTorch preinstalled), in one call: classifier-guided
# reformer candidates trained side by side for MINUTES each (a time-scheduled cosine decay,
# --schedule-minutes) on the JPEG training split and the real uncompressed training originals, beside
# cached Carlini rows of models/cifar10 crafted in shards (--cache-shard) on the same GPU.
#   usage: scripts/gpu_round.sh PAYLOAD OUT MINUTES CANDIDATES [ATTACK:CHUNK:SHARDS:CACHE ...]
# PAYLOAD (carried, ignored by git): whl/ (pydantic and its needs for Python 3.12),
#   data/cifar10/cifar10-jpeg.tar.gz, orig-train.tar (runs/cifar10-originals/train as a tar).
# CANDIDATES: a file, one candidate a line: its name, then the flags of its own (mix, quiet term, ...);
#   every candidate also gets the common flags below (warm start from models/cifar10's reformer, 256 +
#   256 images a step, Adam 3e-4). Lines starting with # are skipped.
# ATTACK:CHUNK:SHARDS:CACHE: a Carlini row of models/cifar10 (e.g. carlini_l2:25:4:docs/results/...),
#   crafted by SHARDS processes into the chunks of CACHE (200 examples, the CPU runs' chunk size).
# OUT gets one .tgz per training work dir (checkpoint, history, the training logits), carlini.tgz (the new
# cache chunks) and the logs. The bundles are written afterwards, on the CPU, from the checkpoints.
# DEVICE=cpu (default cuda) runs the same on a CPU, for a smoke test with tiny candidates.
set -uo pipefail
device=${DEVICE:-cuda}
pay=$1; out=$2; minutes=$3; candidates=$4; shift 4
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$pay"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/orig && tar xf "$pay/orig-train.tar" -C /tmp/orig || exit 1
if [[ $device == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$out/gpu.txt"
fi
runs=/tmp/round; mkdir -p "$runs"
cap=$(( minutes * 60 + 150 ))   # hard stop: the schedule ends at MINUTES of training, after ~1 min of loading
train=(--data-dir "$pay/data" --device "$device" --train-only --name cifar10 --candidate
       --init-from models/cifar10/reformer.onnx --originals /tmp/orig/train --batch-size 256 --lr 3e-4
       --steps 100000 --schedule-minutes "$minutes" --recon-fpr 0 --jsd-fpr 0 0.02)
names=()
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  names+=("$name")
  # shellcheck disable=SC2086
  ( OMP_NUM_THREADS=3 timeout "$cap" python3 -m training.build_guided "${train[@]}" --work-dir "$runs/$name" \
      --out "$runs/$name-bundle" $flags ) > "$runs/$name.log" 2>&1 &
done < "$candidates"
ev=(--bundle models/cifar10 --data-dir "$pay/data" --device "$device" --n-carlini 200 --kappas)
caches=()
for row in "$@"; do
  IFS=: read -r attack chunk shards cache <<< "$row"
  caches+=("$cache")
  for (( i = 0; i < shards; i++ )); do
    ( OMP_NUM_THREADS=1 timeout $(( cap - 30 )) python3 -m training.evaluate.run "${ev[@]}" --attacks "$attack" \
        --cache "$cache" --cache-chunk "$chunk" --cache-shard "$i/$shards" --out "$runs/$attack-$i" ) \
        > "$runs/$attack-$i.log" 2>&1 &
  done
done
wait
echo "all jobs ended after $(( $(date +%s) - start )) s"
tail -n 4 "$runs"/*.log
for name in "${names[@]}"; do
  tar czf "$out/$name.tgz" -C "$runs" "$name"
done
if (( ${#caches[@]} )); then  # the chunks made here: files newer than the script's start
  find "${caches[@]}" -name '*.npz' -newermt "@$start" > "$runs/new-chunks.txt"
  echo "new chunks: $(wc -l < "$runs/new-chunks.txt")"
  tar czf "$out/carlini.tgz" -T "$runs/new-chunks.txt"
fi
tar czf "$out/logs.tgz" -C "$runs" $(cd "$runs" && ls ./*.log ./new-chunks.txt 2>/dev/null)
ls -la "$out"
