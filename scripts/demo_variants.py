"""The demo recipe's neighbours, for the Pixel Transformer alone: how PiT's digits test accuracy moves
with the schedule, EMA, mixup and a random crop. The figures quoted in experiments/demo.py and the
docs come from these variants, one thread per run, on an Intel Xeon (AMX); runs made before `onednn_pays`
(commit 80f36e8) computed their linear layers with oneDNN, later ones with torch's default GEMM, and
that alone moves PiT by a point or two (float rounding changes the trajectory).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/demo_variants.py --variants recipe no-ema --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pixformer import TrainConfig, train
from pixformer.experiments.demo import DEMO_RECIPE

BASE = {**DEMO_RECIPE, "model": "pit-n"}
VARIANTS = {
    "recipe": {},                                                          # batch 16, 60 epochs, EMA 0.998
    "no-ema": {"ema_decay": 0.0},
    "batch8-30ep": {"batch_size": 8, "epochs": 30, "ema_decay": 0.0},
    "mixup-40ep": {"epochs": 40, "task_args": {"mixup": 0.8}},
    "crop1-batch32": {"batch_size": 32, "ema_decay": 0.0, "crop_padding": 1},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/demo-variants")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.variants:
        for seed in args.seeds:
            out = Path(args.out) / f"{name}-seed{seed}"
            r = train(TrainConfig(**{**BASE, **VARIANTS[name], "seed": seed, "out": str(out),
                                     "resume": (out / "checkpoint").exists()}))
            print(json.dumps({"variant": name, "seed": seed, "test_top1": r["test_top1"], "val_top1": r["val_top1"]}),
                  flush=True)


if __name__ == "__main__":
    main()
