"""DiT on the bundled digits (8x8, one channel): pixel tokens (`dit-n/1`, 64 tokens) against 2x2
patches (`dit-n/2`, 16 tokens), the same small model (4 blocks of width 64) and recipe. Each is
judged by a separately trained digits classifier (a ViT with 4x4 patches): the accuracy of that
classifier on 500 class-conditional samples (50 per digit, DDIM 50 steps) at several guidance
scales, and a sample grid per model. A run folder per model under OUT; finished parts are read back.

    .venv/bin/python scripts/diffusion_digits.py --model dit-n/1      # train + sample + judge one model
    .venv/bin/python scripts/diffusion_digits.py --model dit-n/2
    .venv/bin/python scripts/diffusion_digits.py --table              # the README's table
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
    judge = Judge(str(judge_run), model.cfg.in_chans, model.cfg.img_size, list(task.facts.classes))
    n = per_class * model.cfg.num_classes
    row = {"model": model_name, "train_wall_s": wall, "val_loss": json.loads((folder / "done.json").read_text())["val_loss"],
           "judge_test_top1": json.loads((judge_run / "done.json").read_text())["test_top1"], "samples": n}
    for scale in SCALES:
        start = time.time()
        images, labels = sample_images(task, model, n, None, scale, "ddim", 50, 0.0, seed=0, batch_size=500)
        row[f"acc_cfg{scale:g}"] = judge.accuracy(images, labels, torch.device("cpu"))
        row[f"sample_s_cfg{scale:g}"] = round(time.time() - start, 1)
        grid = images.view(per_class, model.cfg.num_classes, *images.shape[1:])[:8].flatten(0, 1)  # 8 per digit
        save_png(tile(to_uint8(grid), nrow=model.cfg.num_classes), folder / f"samples_cfg{scale:g}.png", scale=4)
    result_file.write_text(json.dumps(row, indent=1))
    return row


def table(out: Path) -> str:
    head = (f"| model | tokens | train ({DIT['epochs']} epochs) | val loss | "
            + " | ".join(f"judge acc., guidance {s:g}" for s in SCALES) + " |")
    rows = [head, "|" + "---|" * (4 + len(SCALES))]
    for name in MODELS:
        f = out / name.replace("/", "-") / "judged.json"
        if not f.exists():
            rows.append(f"| {name} | | not run | |" + " |" * len(SCALES))
            continue
        r = json.loads(f.read_text())
        tokens = 64 if name.endswith("/1") else 16
        rows.append(f"| {name} | {tokens} | {r['train_wall_s'] / 60:.1f} min | {r['val_loss']:.4f} | "
                    + " | ".join(f"{100 * r[f'acc_cfg{s:g}']:.1f} %" for s in SCALES) + " |")
    judge = next((json.loads(f.read_text())["judge_test_top1"] for f in out.glob("*/judged.json")), None)
    if judge is not None:
        rows.append(f"\nJudge: vit-n/4 classifier, {100 * judge:.2f} % on the digits' test split.")
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
