#!/usr/bin/env bash
# The documentation's (docs/results.md) native-resolution figures: Caltech-101 (the shared training photos, 10 % held out, seed 0),
# one model (vit-n/4: 6 blocks, width 128, patch 4, mean pooling) trained three ways, at about equal
# training compute (tokens seen) for the first two, each run on one thread, the three side by side:
#   square   every photo resized to 48x48 (aspect ratio lost): 144 tokens, 10 epochs
#   packed   native aspect ratio, longer side 48 (mean 103.6 tokens), packed into sequences of 288,
#            14 epochs (14 x 103.6 ~ 10 x 144 tokens per image)
#   drop     packed, and 25 % of each image's tokens dropped in training (same 14 epochs: 3/4 of the compute)
# then each evaluated at longer side / square size 24, 32, 48 and 64 (`pixformer eval --resolutions`).
#   scripts/navit_caltech.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/caltech101.tar.gz}
OUT=${1:-runs/navit-caltech}
[[ -e $DATA ]] || { echo "$DATA not found: set DATA to Caltech-101's photos in class folders, or an archive of them (see docs/data.md)"; exit 1; }
COMMON=(--model vit-n/4 --pool mean --data $DATA --batch-size 64 --lr 1e-3 --warmup-epochs 1 --hflip
        --progress false --resume)
run() {  # name, then its own options
  local name=$1; shift
  local start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/pixformer train "${COMMON[@]}" --out $OUT/$name "$@" > $OUT/$name.log 2>&1
  echo "$(( $(date +%s) - start ))" > $OUT/$name.seconds
}
mkdir -p $OUT
run square --img-size 48 --epochs 10 &
run packed --max-side 48 --pack-length 288 --epochs 14 &
run drop --max-side 48 --pack-length 288 --epochs 14 --token-drop 0.25 &
wait
for name in square packed drop; do
  OMP_NUM_THREADS=2 .venv/bin/pixformer eval --checkpoint $OUT/$name --split val --resolutions 24,32,48,64 \
    --out $OUT/$name/resolutions | tee $OUT/$name.resolutions.txt
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':<8} {'val top1':>9} {'train s':>8}")
for name in ("square", "packed", "drop"):
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_top1" in r][-1]
    print(f"{name:<8} {last['val_top1']:>9.4f} {int((out / f'{name}.seconds').read_text()):>8}")
PY
