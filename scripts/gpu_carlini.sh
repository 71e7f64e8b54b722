#!/usr/bin/env bash
# The full-strength Carlini rows of the CIFAR-10 issue on a lent GPU machine (H100/H200, PyTorch with
# CUDA preinstalled): attacks in torch CUDA; the judging core on onnxruntime CUDA when onnxruntime-gpu
# is installed there (../shared/tools/gpu/README.md: /tmp/site-ort), else on its CPU (the report's
# judge_providers says which). The adversarial examples are kept in OUT/adv-cache (keyed by the
# classifier's sha256, the attack's parameters and the images), so the same rows can be judged again on
# the CPU machine, with any bundle sharing the classifier, without attacking again:
#   magnet evaluate --bundle B --data-dir D --out O --attacks carlini_l0 --cache runs/adv-cache
#
#   usage: scripts/gpu_carlini.sh DATA_DIR WHEEL_DIR OUT_DIR [JOB ...]
# DATA_DIR travels with the call (carry an ignored folder holding mnist/ and cifar10/, e.g. runs/data;
# the MNIST IDX files and the CIFAR-10 JPEG archive fit within the 64 MiB with room for the tree).
# JOBs (default: cifar10-linf and cifar10-l0, in this order; each under its own time cap so that one call returns):
#   mnist-l0      Carlini L0 with Carlini's schedule and budget, 200 examples, models/mnist (not in the
#                 default list: it ran on the CPU, docs/results/eval-mnist-cw-l0-carlini)
#   cifar10-l2    Carlini L2, 9 binary-search steps x 1,000 iterations, 200 examples, models/cifar10 (not
#                 in the default list: it ran on the CPU, docs/results/eval-cifar10-cw-l2-carlini)
#   cifar10-linf  Carlini L-infinity, Carlini's budget, 200 examples, models/cifar10
#   cifar10-l0    Carlini L0 with Carlini's schedule and budget, 200 examples, models/cifar10
# Each job's report.json is written after its row; the adversarial examples are kept CHUNK at a time
# (default 10, as the CPU run of Carlini L-infinity, so that chunks crafted on either machine are reused
# by the other: `magnet evaluate --cache-chunk`), so a job cut by its cap (CAP_S, seconds per job) keeps
# the chunks it finished, and the same call run again (OUT carried back) picks up where it stopped.
# SLOTS=B (L0 jobs): one example a chunk, B of them side by side on the GPU, a finished one's slot
# refilled at once (`magnet evaluate --cache-slots`; the CPU run's chunks are one example each too, so
# they are reused), then a second run judges the row once every example is kept. On 2026-12-04,
# SLOTS=200 crafted the L0 row's last 107 examples side by side on an H200 in 277 s.
# SEED=DIR: copy the chunks already kept in DIR (e.g. docs/results/eval-cifar10-cw-l0-full/adv-cache)
# into OUT/adv-cache first, so that only the missing examples are crafted.
# At the end OUT/adv-cache is packed into OUT/adv-cache.tgz (the device tool brings back only so many
# files; 200 chunk files were too many): unpack it here, then check the GPU's examples against the
# float32 classifier (scripts/cache_by_device.py --drop-unfooled cuda) before judging them.
# The attacks run in full float32 (magnet evaluate turns TF32 off): with cuDNN's default TF32, 11 of
# those 107 κ = 0 examples did not fool the float32 classifier that judges them.
set -uo pipefail
data=$1; wheels=$2; out=$3; shift 3
jobs=("$@"); [ ${#jobs[@]} -eq 0 ] && jobs=(cifar10-linf cifar10-l0)
cap=${CAP_S:-500}
chunk=${CHUNK:-10}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH=/tmp/site-ort:/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$out/adv-cache"
[ -n "${SEED:-}" ] && cp -n "$SEED"/*.npz "$out/adv-cache/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())' | tee -a "$out/gpu.txt"
judge=cpu
python3 -c 'import onnxruntime as o; assert "CUDAExecutionProvider" in o.get_available_providers()' 2>/dev/null && judge=cuda
common=(--data-dir "$data" --device cuda --judge-device "$judge" --cache "$out/adv-cache" --cache-chunk "$chunk" --n-carlini 200 --kappas)
for job in "${jobs[@]}"; do
  case $job in
    mnist-l0) args=(--bundle models/mnist --attacks carlini_l0) ;;
    cifar10-l2) args=(--bundle models/cifar10 --attacks carlini_l2) ;;
    cifar10-linf) args=(--bundle models/cifar10 --attacks carlini_linf) ;;
    cifar10-l0) args=(--bundle models/cifar10 --attacks carlini_l0) ;;
    *) echo "unknown job $job"; exit 2 ;;
  esac
  if [ -n "${SLOTS:-}" ] && [[ $job == *-l0 ]]; then
    ( time timeout "$cap" python3 -m training.evaluate.run "${common[@]}" "${args[@]}" --cache-chunk 1 \
        --cache-shard 0/1 --cache-slots "$SLOTS" --out "$out/eval-$job" ) > "$out/$job-slots.log" 2>&1
    grep -q "200 of 200 examples now in the cache" "$out/$job-slots.log" || { echo "$job: not all crafted"; tail -n 4 "$out/$job-slots.log"; continue; }
    args+=(--cache-chunk 1)
  fi
  ( time timeout "$cap" python3 -m training.evaluate.run "${common[@]}" "${args[@]}" --out "$out/eval-$job" ) \
      > "$out/$job.log" 2>&1
  echo "$job: exit $?"; tail -n 4 "$out/$job.log"
done
echo "$(ls "$out/adv-cache" | wc -l) chunk files in $out/adv-cache"
tar czf "$out/adv-cache.tgz" -C "$out" adv-cache && rm -rf "$out/adv-cache"
ls -la "$out"
