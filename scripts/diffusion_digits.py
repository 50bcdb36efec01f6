"""DiT on the bundled digits (8x8, one channel): pixel tokens (`dit-n/1`, 64 tokens) against 2x2
patches (`dit-n/2`, 16 tokens), the same small model (4 blocks of width 64) and recipe. Each is
judged by a separately trained digits classifier (a ViT with 4x4 patches): the accuracy of that
classifier on 500 class-conditional samples (50 per digit), with the final weights and with their
EMA, at several guidance scales (DDIM 50 steps), then with two more samplers (guidance 2); sample
grids. A run folder per model under OUT; finished parts are read back.

    .venv/bin/python scripts/diffusion_digits.py --model dit-n/1      # train + sample + judge one model
    .venv/bin/python scripts/diffusion_digits.py --model dit-n/2
    .venv/bin/python scripts/diffusion_digits.py --table              # the table in docs/results.md
"""
from __future__ import annotations

import argparse
import fcntl
import json
import time
from pathlib import Path

import torch

from pixformer import TrainConfig, train
from pixformer.engine.checkpoint import find_checkpoint, load_model
from pixformer.experiments.generate import diffusion_task, sample_images
from pixformer.experiments.quality import Judge
from pixformer.tasks.figures import save_png, tile, to_uint8

MODELS = ("dit-n/1", "dit-n/2")
SCALES = (1.0, 2.0, 4.0)
WEIGHTS = ("model", "ema")
SAMPLERS = (("dpm-solver", 20), ("ddpm", 250))   # DDIM 50 at guidance 2 is the guidance sweep's column
DIT = dict(task="diffusion", data="digits", model_args=dict(depth=4, dim=64, heads=4), epochs=100, batch_size=32,
           lr=1e-3, min_lr=1e-5, weight_decay=0.0, warmup_epochs=2, clip_grad=1.0, ema_decay=0.999,
           precision="fp32", progress=False, task_args=dict(samples=10, sample_steps=20, cfg_scale=2.0))
# the judge: the demo's classifier recipe at patch 4 (about 98 % on the digits' test split)
JUDGE = dict(task="classify", model="vit-n/4", data="digits", model_args=dict(depth=4, dim=64, heads=4), epochs=60,
             batch_size=16, lr=1e-3, warmup_epochs=3, ema_decay=0.998, precision="fp32", progress=False)


def trained(cfg: TrainConfig) -> float:
    """Train `cfg` unless its folder holds a finished run; the seconds it took (0 if it was there)."""
    done = Path(cfg.out) / "done.json"
    if done.exists():
        return json.loads(done.read_text())["wall_s"]
    start = time.time()
    result = train(TrainConfig(**{**cfg.__dict__, "resume": find_checkpoint(cfg.out) is not None}))
    wall = round(time.time() - start, 1)
    done.write_text(json.dumps({"wall_s": wall, **{k: v for k, v in result.items() if k.startswith(("val_", "test_"))}}))
    return wall


def judge_model(out: Path, model_name: str, per_class: int = 50) -> dict:
    folder = out / model_name.replace("/", "-")
    result_file = folder / "judged.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    wall = trained(TrainConfig(**DIT, model=model_name, out=str(folder)))
    judge_run = out / "judge"
    with open(out / "judge.lock", "w") as lock:                       # one process trains it, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        trained(TrainConfig(**JUDGE, out=str(judge_run)))
    model, state = load_model(folder)
    task = diffusion_task(state, str(folder))
    judge = Judge(str(judge_run), model.cfg.in_chans, model.cfg.img_size, list(task.facts.classes),
                  torch.device("cpu"))
    n = per_class * model.cfg.num_classes
    row = {"model": model_name, "train_wall_s": wall, "val_loss": json.loads((folder / "done.json").read_text())["val_loss"],
           "judge_test_top1": json.loads((judge_run / "done.json").read_text())["test_top1"], "samples": n}
    for weights in WEIGHTS:
        model, _ = load_model(folder, weights)
        for scale in SCALES:
            row[f"acc_{weights}_cfg{scale:g}"] = judged(task, model, judge, n, scale, "ddim", 50)
        for sampler, steps in SAMPLERS:
            start = time.time()
            row[f"acc_{weights}_{sampler}{steps}"] = judged(task, model, judge, n, 2.0, sampler, steps,
                                                           folder / f"samples_{weights}_{sampler}{steps}.png")
            row[f"sample_s_{weights}_{sampler}{steps}"] = round(time.time() - start, 1)
    result_file.write_text(json.dumps(row, indent=1))
    return row


def judged(task, model, judge: Judge, n: int, scale: float, sampler: str, steps: int, grid: Path | None = None) -> float:
    """The judge's accuracy on n samples (classes 0..9 in turn, seed 0); a grid of 8 per digit if asked."""
    images, labels = sample_images(task, model, n, None, scale, sampler, steps, 0.0, seed=0, batch_size=500)
    if grid is not None:
        K = model.cfg.num_classes
        rows = images.view(n // K, K, *images.shape[1:])[:8].flatten(0, 1)         # 8 rows, one digit per column
        save_png(tile(to_uint8(rows), nrow=K), grid, scale=4)
    return judge.accuracy(images, labels)


def table(out: Path) -> str:
    runs = {name: json.loads(f.read_text()) for name in MODELS
            if (f := out / name.replace("/", "-") / "judged.json").exists()}
    rows = [f"| model | tokens | train ({DIT['epochs']} epochs) | val loss | weights | "
            + " | ".join(f"DDIM 50, guidance {s:g}" for s in SCALES) + " | "
            + " | ".join(f"{sampler} {steps}, guidance 2" for sampler, steps in SAMPLERS) + " |",
            "|" + "---|" * (5 + len(SCALES) + len(SAMPLERS))]
    for name, r in runs.items():
        for w in WEIGHTS:
            rows.append(f"| {name} | {64 if name.endswith('/1') else 16} | {r['train_wall_s'] / 60:.1f} min | "
                        f"{r['val_loss']:.4f} | {w} | "
                        + " | ".join(f"{100 * r[f'acc_{w}_cfg{s:g}']:.1f} %" for s in SCALES) + " | "
                        + " | ".join(f"{100 * r[f'acc_{w}_{sm}{st}']:.1f} %" for sm, st in SAMPLERS) + " |")
    if runs:
        r = next(iter(runs.values()))
        rows.append(f"\nJudge: vit-n/4 classifier, {100 * r['judge_test_top1']:.2f} % on the digits' test split. "
                    f"Accuracy of the judge on {r['samples']} samples: DDIM 50 steps at each guidance scale, "
                    "then each sampler at guidance 2. Val loss: the EMA weights' noise MSE on the held-out digits.")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS)
    ap.add_argument("--out", type=Path, default=Path("runs/diffusion-digits"))
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if not args.table:
        if args.model is None:
            ap.error("--model is required (or --table)")
        print(json.dumps(judge_model(args.out, args.model)), flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
