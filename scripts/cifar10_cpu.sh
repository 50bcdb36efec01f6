#!/usr/bin/env bash
# The documentation's (docs/results.md) CIFAR-10 CPU number: train the CPU recipe on the shared CIFAR-10 training JPEGs
# (10 % held out by the loader, seed 0), write the held-out images to a separate ImageFolder
# directory, and evaluate the checkpoint there with `pixformer eval --json`.
#   scripts/cifar10_cpu.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-train-jpg.tar.gz}   # DATA=cifar10: the official release
RUN=${1:-runs/cifar10-cpu}
[[ $DATA == cifar10 || -e $DATA ]] || { echo "$DATA not found: set DATA to the CIFAR-10 archive, or DATA=cifar10 (see docs/data.md#the-cifar-10-archive-of-these-pages)"; exit 1; }
start=$(date +%s)
.venv/bin/pixformer train --config configs/cifar10-cpu.yaml --data $DATA --out $RUN --resume
echo "training wall time: $(( $(date +%s) - start )) s (OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}, $(getconf _NPROCESSORS_ONLN) cores)"
[[ -d runs/cifar10-heldout ]] || .venv/bin/python scripts/export_split.py --data $DATA --img-size 32 --split val --out runs/cifar10-heldout
.venv/bin/pixformer eval --checkpoint $RUN --data runs/cifar10-heldout --json | tee $RUN/eval-heldout.json
