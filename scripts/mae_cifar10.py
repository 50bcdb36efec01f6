"""Does MAE pretraining help at a CPU budget? On the shared CIFAR-10 training JPEGs at 16x16, for one
model (pixel tokens `pit-n` or patch 2 `vit-n/2`, both 4 blocks of width 64): MAE-pretrain, then
fine-tune and linearly probe the encoder, against the same classifier trained from scratch for as many
epochs as pretraining and fine-tuning together. Every run trains on the same 5,000-image subset of
the 45,000 non-held-out images and reports top-1 on the 5,000 held-out ones (validation: the test
split is not in the shared data). A run folder per stage under OUT/<model>; finished stages are read
back, an interrupted one resumes.

    .venv/bin/python scripts/mae_cifar10.py --model pit-n  [--stages mae finetune probe scratch]
    .venv/bin/python scripts/mae_cifar10.py --model vit-n/2
    .venv/bin/python scripts/mae_cifar10.py --table          # the table in docs/results.md from what has finished

One thread per process is the fastest way to use a 2-core machine: run two models (or a model's
`scratch` stage beside its other stages) side by side with OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pixformer import TrainConfig, train
from pixformer.engine.checkpoint import find_checkpoint

DATA = "../shared/data/cifar10-train-jpg.tar.gz"
# shared by every stage: the data, the subset, the encoder (MAE's fixed sincos position embedding, so
# the scratch baseline has the same architecture), the usual crop + flip
COMMON = dict(img_size=16, train_subset=5000, crop_padding=2, hflip=True, progress=False,
              model_args=dict(depth=4, dim=64, heads=4, pos_embed="sincos2d"))
PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 16, 8
# MAE's betas, weight decay and schedule shape; the learning rates are ours (the reference's
# 1.5e-4 x batch / 256 is tuned for batch 4096 and 800 epochs)
STAGES = {
    "mae": dict(task="mae", epochs=PRETRAIN_EPOCHS, batch_size=64, lr=1e-3, min_lr=0.0, weight_decay=0.05,
                betas=(0.9, 0.95), warmup_epochs=2, clip_grad=0.0),
    "finetune": dict(task="classify", init="mae", epochs=FINETUNE_EPOCHS, batch_size=64, lr=1e-3,
                     layer_decay=0.75, weight_decay=0.05, warmup_epochs=1, task_args=dict(label_smoothing=0.1)),
    "probe": dict(task="probe", init="mae", epochs=FINETUNE_EPOCHS, batch_size=64, lr=0.01, weight_decay=0.0,
                  warmup_epochs=1),
    "scratch": dict(task="classify", epochs=PRETRAIN_EPOCHS + FINETUNE_EPOCHS, batch_size=64, lr=1e-3,
                    weight_decay=0.05, warmup_epochs=1, task_args=dict(label_smoothing=0.1)),
}
MODELS = ("pit-n", "vit-n/2")


def stage(out: Path, model: str, name: str, data: str = DATA) -> dict:
    """Train one stage (or read its finished result) and return its final validation figures."""
    folder = out / model.replace("/", "-") / name
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    args = dict(STAGES[name])
    if "init" in args:
        args["init"] = str(out / model.replace("/", "-") / args["init"])
    start = time.time()
    cfg = TrainConfig(**COMMON, **args, data=data, model=model, out=str(folder), resume=find_checkpoint(folder) is not None)
    result = train(cfg)
    keep = {k: v for k, v in result.items() if k.startswith(("val_", "best_"))}
    keep["wall_s"] = round(time.time() - start, 1)          # this sitting only, if it was resumed
    done.write_text(json.dumps(keep))
    return keep


def table(out: Path) -> str:
    pe, fe = PRETRAIN_EPOCHS, FINETUNE_EPOCHS
    rows = [f"| model | tokens | MAE pretrain ({pe} ep) | + fine-tune ({fe} ep) | + linear probe ({fe} ep) | "
            f"scratch ({pe + fe} ep) |",
            "|---|---|---|---|---|---|"]
    for model in MODELS:
        res = {}
        for name in STAGES:
            f = out / model.replace("/", "-") / name / "result.json"
            res[name] = json.loads(f.read_text()) if f.exists() else None

        def cell(name, key="val_top1"):
            r = res[name]
            if r is None:
                return "not run"
            value = f"pixel MSE {r['val_loss']:.4f}" if key == "val_loss" else f"{100 * r[key]:.2f} %"
            return f"{value} ({r['wall_s'] / 60:.0f} min)"

        tokens = 256 if model == "pit-n" else 64
        rows.append(f"| {model} | {tokens} | {cell('mae', 'val_loss')} | {cell('finetune')} | {cell('probe')} | "
                    f"{cell('scratch')} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS)
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    ap.add_argument("--out", type=Path, default=Path("runs/mae-cifar10"))
    ap.add_argument("--data", default=DATA, help="the CIFAR-10 training images (cifar10: the official release)")
    ap.add_argument("--table", action="store_true", help="print the table of finished stages and stop")
    args = ap.parse_args()
    if not args.table:
        if args.model is None:
            ap.error("--model is required (or --table)")
        if args.data != "cifar10" and not Path(args.data).exists():
            raise SystemExit(f"{args.data} not found: give --data the CIFAR-10 archive, or cifar10 for the official "
                             "release (see docs/data.md#the-cifar-10-archive-of-these-pages)")
        for name in args.stages:
            r = stage(args.out, args.model, name, args.data)
            print(f"{args.model} {name}: {json.dumps(r)}", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
