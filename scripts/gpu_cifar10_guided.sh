#!/usr/bin/env bash
# The training half of the classifier-guided CIFAR-10 bundles on a lent GPU machine (H100/H200, PyTorch
# preinstalled): the default (attack-trained), the attack-free variant and the 8-member pool, with
# --train-only and a wall-time cap each. The bundles are then written on the CPU machine by the same
# commands without --train-only (they reuse the checkpoints in the work dirs; see docs/results/).
#   usage: [MIX=fgsm=3,pgd=1,preimage=1] scripts/gpu_cifar10_guided.sh DATA_DIR WHEEL_DIR OUT_DIR [MINUTES]
# MIX: the default's perturbed copies (fgsm=1,pgd=1 unless set; ``preimage`` adds JPEG pre-images of the
# training images, docs/results/cifar10-selection-round5); EXTRA: more arguments for the default's job
# (e.g. EXTRA="--jpeg-quality 75": trained behind the JPEG input step, docs/results/cifar10-selection-round16)
set -uo pipefail
data=$1; wheels=$2; out=$3; minutes=${4:-4}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
runs=/tmp/runs; mkdir -p "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
common=(--data-dir "$data" --device cuda --train-only --max-minutes "$minutes" --batch-size 256)
# three jobs share the GPU; each stops (checkpointed) at its cap and resumes on the next call
( time python3 -m training.build_guided "${common[@]}" --work-dir $runs/c --mix "${MIX:-fgsm=1,pgd=1}" --steps 20000 ${EXTRA:-} ) \
    > $runs/c.log 2>&1 &
( time python3 -m training.build_guided "${common[@]}" --work-dir $runs/b --mix noise=1 --steps 20000 ) \
    > $runs/b.log 2>&1 &
( time python3 -m training.build_guided "${common[@]}" --work-dir $runs/pool --mix fgsm=1,pgd=1 --steps 8000 \
    --members 8 --alpha 0.1 ) > $runs/pool.log 2>&1 &
wait
tail -n 3 $runs/*.log
for job in c b pool; do
  cp $runs/$job.log "$out/"; tar czf "$out/$job.tgz" -C $runs $job --exclude=train_logits.npy
done
ls -la "$out"
