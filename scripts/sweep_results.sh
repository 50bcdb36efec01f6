#!/usr/bin/env bash
# The documentation's (docs/results.md) sweep numbers: patch-size sweeps, position / locality ablations, PiT vs ViT vs ConvMixer.
#
#   scripts/sweep_results.sh digits      # fixed-input and fixed-tokens sweeps on digits
#   scripts/sweep_results.sh ablations   # position-embedding and pixel-permutation ablations on digits
#   scripts/sweep_results.sh cifar       # fixed-input sweep and ConvMixer at 16x16 on the shared CIFAR-10 images
#   scripts/sweep_results.sh             # all three (independent: run them side by side if you have the cores)
#
# Every sweep is cached under runs/results/: re-running continues where it stopped, finished points are
# not trained again. Each prints its table; the same table is in <folder>/results.md.
# One thread per run: on a busy 2-core machine two threads per process fight for the cores and are
# several times slower. The documented timings were taken that way, on a shared (loaded) 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PIX="nice -n 5 .venv/bin/pixformer"
OUT=runs/results
what="${1:-all}"

# The documented digits tables' recipe: the demo's 4-layer, 64-wide ViT (DEMO_RECIPE in src/pixformer/experiments/demo.py
# now trains it 60 epochs at batch 16 with a 3-epoch warm-up and an EMA), here 80 epochs, batch 32, AdamW 1e-3 with
# train's 1-epoch warm-up, no EMA, fp32, no augmentation. Test accuracy on the fixed 359-image
# split. fp32 everywhere (as the documented tables were measured), also on CPUs where --precision auto is bf16.
DIGITS="--data digits --depth 4 --dim 64 --heads 4 --epochs 80 --batch-size 32 --lr 1e-3 --precision fp32 --progress false"

if [[ "$what" == digits || "$what" == all ]]; then
  # 1. fixed input size (8x8): patch 8 -> 4 -> 2 -> 1, tokens 1 -> 64
  $PIX sweep --regime fixed-input --patches '[8,4,2,1]' --seeds '[0,1]' $DIGITS --out $OUT/digits-fixed-input
  # 2. fixed sequence length (16 tokens): 16x16 (upsampled) p=4, 8x8 p=2, 4x4 (downsampled) p=1
  $PIX sweep --regime fixed-tokens --tokens 16 --patches '[4,2,1]' --seeds '[0,1]' $DIGITS --out $OUT/digits-fixed-tokens
fi

if [[ "$what" == ablations || "$what" == all ]]; then
  # 3. position embedding at patch 4, 2, 1 (learned = the fixed-input sweep above, same recipe)
  for pos in sincos2d none; do
    $PIX sweep --patches '[4,2,1]' --seeds '[0,1]' $DIGITS --pos-embed $pos --out $OUT/digits-pos-$pos
  done
  # 4. locality: one fixed random permutation of the 64 pixels; then the PiT paper's local corruption,
  #    T = 64 swaps of pixels at most 2 apart (Chebyshev). Same permutation for train and test.
  $PIX sweep --patches '[4,1]' --seeds '[0]' $DIGITS --permute-pixels --out $OUT/digits-permuted
  $PIX sweep --patches '[4,1]' --seeds '[0]' $DIGITS --local-swaps 64 --swap-distance 2 --out $OUT/digits-swaps64-d2
fi

# CIFAR-10 (the shared 50,000 training JPEGs; 10 % held out as validation, seed 0) at 16x16, a 5,000-image
# training subset, 4 epochs: a CPU-sized budget (about 25 min on a busy 2-core CPU), far from converged.
# The same recipe for every model.
DATA=${DATA:-../shared/data/cifar10-train-jpg.tar.gz}   # DATA=cifar10: the official release
CIFAR="--data $DATA --img-size 16 --train-subset 5000 --epochs 4 --batch-size 64 --lr 2e-3 --hflip --precision fp32 --progress false"

if [[ "$what" == cifar || "$what" == all ]]; then
  if [[ $DATA != cifar10 && ! -e $DATA ]]; then echo "skipping CIFAR: $DATA not found"; exit 0; fi
  # 5. fixed input size 16x16: patch 8 -> 1 (4 -> 256 tokens), the 4x64 ViT of the digits recipe
  $PIX sweep --regime fixed-input --patches '[8,4,2,1]' --seeds '[0]' $CIFAR --depth 4 --dim 64 --heads 4 \
      --out $OUT/cifar16-fixed-input
  # 6. ConvMixer-256/8 (kernel 5, patch 2: the authors' CIFAR setting) on the same budget
  $PIX sweep --model convmixer-256/8 --patches '[2]' --seeds '[0]' $CIFAR --kernel-size 5 --out $OUT/cifar16-convmixer
fi
