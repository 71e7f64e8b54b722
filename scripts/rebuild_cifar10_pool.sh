#!/usr/bin/env bash
# Rebuild models/cifar10-pool on the default's recipe (docs/results/pools.md, "Rebuilding the pool on c15"),
# stage by stage, so that a CPU run can be resumed across sessions:
#
#   scripts/rebuild_cifar10_pool.sh train      # the eight members, jointly (resumes from $WORK/reformer.ckpt;
#                                              #   MINUTES=N stops after N minutes, checkpointed)
#   scripts/rebuild_cifar10_pool.sh stash      # copy the training checkpoint into $WIP, to commit: a CPU run
#                                              #   spans sessions whose work areas need not survive; train
#                                              #   restores it from there when $WORK has none
#   scripts/rebuild_cifar10_pool.sh rule       # validation only: selection table, domain attacks, the rule
#   scripts/rebuild_cifar10_pool.sh ship       # only if the rule holds: the bundle into models/cifar10-pool,
#                                              #   with the per-member clean figures on 2,000 test images
#   scripts/rebuild_cifar10_pool.sh verify     # (part of ship) models/cifar10-pool holds the candidate's
#                                              #   members byte for byte, and its thresholds
#   scripts/rebuild_cifar10_pool.sh graybox    # the graybox 8 x 8 table on the test set (200 per column)
#   scripts/rebuild_cifar10_pool.sh adaptive   # whitebox and pool-EOT attacks at the shipped pool's budget
#
# Needs the uncompressed CIFAR-10 originals written by scripts/cifar10_originals.py ($ORIG, default
# runs/cifar10-originals). Every stage logs to $LOGS/rebuild-cifar10-pool-<stage>.log (LOGS=runs) as well
# as stdout. The paths are variables (DATA, WORK, CAND, POOL, RESULTS, WIP, ...) for tests and other layouts.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

DATA=${DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
MAGNET=${MAGNET:-.venv/bin/magnet}
WORK=${WORK:-runs/pool15}
CAND=${CAND:-runs/pool15-bundle}
ORIG=${ORIG:-runs/cifar10-originals}
SEL=${SEL:-runs/selection}
RESULTS=${RESULTS:-docs/results/cifar10-pool15-selection}
MINUTES=${MINUTES:-0}
WIP=${WIP:-wip/cifar10-pool15}
POOL=${POOL:-models/cifar10-pool}
LOGS=${LOGS:-runs}

# the recipe; the only difference between the candidate and the shipped build is --candidate / --out
RECIPE=(--data-dir "$DATA" --work-dir "$WORK" --name cifar10-pool --init-from models/cifar10/reformer.onnx
        --init-spread 0.05 --members 8 --alpha 1 --mix fgsm=2,pgd=1,original=3,fgsm_orig=2,pgd_orig=1
        --originals "$ORIG/train" --quiet-weight 3 --quiet-rows preimage --steps 300 --lr 3e-4
        --recon-fpr 0 --jsd-fpr 0 0.02 --figures-limit 2000)

stage=${1:?"usage: $0 train|stash|rule|ship|verify|graybox|adaptive"}
mkdir -p "$LOGS"
exec > >(tee -a "$LOGS/rebuild-cifar10-pool-$stage.log") 2>&1
echo "== $stage $(date -u +%FT%TZ) $(git rev-parse --short HEAD)"

case "$stage" in
train)
    [ -d "$ORIG/train" ] || { echo "no originals in $ORIG/train (scripts/cifar10_originals.py)"; exit 2; }
    if [ ! -f "$WORK/reformer.ckpt" ] && [ -f "$WIP/reformer.ckpt" ]; then
        mkdir -p "$WORK" && cp "$WIP"/* "$WORK"/ && echo "restored the checkpoint from $WIP"
    fi
    "$MAGNET" train cifar10-guided "${RECIPE[@]}" --out "$CAND" --candidate --max-minutes "$MINUTES"
    ;;
stash)
    [ -f "$WORK/reformer.ckpt" ] || { echo "no checkpoint in $WORK"; exit 2; }
    mkdir -p "$WIP"
    cp "$WORK/reformer.ckpt" "$WORK/train_logits.npy" "$WIP"/
    "$PY" -c "import sys, torch; c = torch.load(sys.argv[1], map_location='cpu', weights_only=False); print('stashed step', c['step'], 'of the run in', sys.argv[1])" "$WIP/reformer.ckpt"
    ;;
rule)
    [ -f "$CAND/manifest.json" ] || { echo "no candidate bundle in $CAND: run the train stage to the end"; exit 2; }
    [ -f "$SEL/set.npz" ] || "$PY" -m training.evaluate.selection make-set --data-dir "$DATA" --out "$SEL/set.npz"
    "$PY" -m training.evaluate.selection table --data-dir "$DATA" --set "$SEL/set.npz" --cache "$SEL/scores" \
        --every-member --out "$RESULTS" --bundles "$CAND"
    "$PY" scripts/domain_attacks.py --bundle "$CAND" --every-member --images "$ORIG/val" --data-dir "$DATA" \
        --out "$RESULTS/domain-attacks.json"
    "$PY" scripts/pool_rule.py --shipped "$POOL" --rebuilt "$CAND" \
        --selection "$RESULTS/shipped/selection.json" "$RESULTS/selection.json" \
        --domain "$RESULTS/shipped/domain-attacks.json" "$RESULTS/domain-attacks.json" --out "$RESULTS/rule.json"
    ;;
ship)
    [ -f "$RESULTS/rule.json" ] || { echo "run the rule stage first"; exit 2; }
    "$PY" - "$RESULTS/rule.json" <<'EOF'
import json, sys
verdict = json.load(open(sys.argv[1]))
if not verdict.get("replace"):
    sys.exit(f"the rule does not hold ({sys.argv[1]}): the shipped pool stays")
EOF
    "$MAGNET" train cifar10-guided "${RECIPE[@]}" --out "$POOL"
    "$SELF" verify
    ;;
verify)
    # what ships must be what the rule measured: the same members and thresholds as the candidate
    "$PY" - "$CAND" "$POOL" <<'EOF'
import json, sys
from pathlib import Path
from service.defense.bundle import sha256_of
cand, pool = (Path(p) for p in sys.argv[1:3])
a, b = (json.loads((p / "manifest.json").read_text()) for p in (cand, pool))
if a["members"] != b["members"]:
    sys.exit(f"the members' files, detectors or thresholds differ between {cand} and {pool}")
for f in sorted({m["reformer"] for m in a["members"]}):
    if sha256_of(cand / f) != sha256_of(pool / f):
        sys.exit(f"{f} differs between {cand} and {pool}")
classifier = lambda m: [f["sha256"] for f in m["files"] if f.get("role") == "classifier"]
if classifier(a) != classifier(b):
    sys.exit(f"the classifiers differ between {cand} and {pool}")
print(f"{pool}: the candidate's {len(a['members'])} members and thresholds, as measured by the rule")
EOF
    ;;
graybox)
    "$MAGNET" evaluate --data-dir "$DATA" --bundle "$POOL" --out docs/results/eval-cifar10-pool-graybox \
        --attacks --kappas --graybox --n-graybox 200 --carlini-steps 2 --carlini-iterations 100 \
        --carlini-initial-const 1 --cache runs/adv-cache
    ;;
adaptive)
    "$MAGNET" evaluate --bundle "$POOL" --data-dir "$DATA" --out docs/results/eval-cifar10-pool-adaptive \
        --attacks --adaptive --n-adaptive 30 --carlini-steps 2 --carlini-iterations 100 \
        --carlini-initial-const 0.1 --adaptive-pgd 0.03137 --adaptive-pgd-steps 50
    "$MAGNET" evaluate --bundle "$POOL" --data-dir "$DATA" --out docs/results/eval-cifar10-pool-adaptive-pgd100 \
        --attacks --kappas --n-adaptive 100 --adaptive-pgd 0.03137 --adaptive-pgd-steps 50
    ;;
*)
    echo "unknown stage $stage: train|stash|rule|ship|verify|graybox|adaptive"; exit 2
    ;;
esac
