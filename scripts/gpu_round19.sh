#!/usr/bin/env bash
# Selection round 19 on a lent GPU machine, in one call (docs/results/cifar10-selection-round19/README.md):
# its three candidates (candidates.txt there, warm-started from models/cifar10, c6 then) trained six
# minutes each, beside the full-strength Carlini L-infinity and L0 rows of models/cifar10 in shards.
#   usage: scripts/gpu_round19.sh PAYLOAD OUT [MINUTES]   (PAYLOAD and OUT: see scripts/gpu_round.sh)
here=$(dirname "$0")
exec "$here/gpu_round.sh" "$1" "$2" "${3:-6}" docs/results/cifar10-selection-round19/candidates.txt \
  carlini_linf:10:3:docs/results/eval-cifar10-cw-linf-full/adv-cache \
  carlini_l0:1:4:docs/results/eval-cifar10-cw-l0-full/adv-cache
