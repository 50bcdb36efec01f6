"""The CIFAR-10 speedrun on a CPU: train a recipe from configs/ on the shared CIFAR-10 training JPEGs
(10 % held out, seed 0: the accuracy reported is on those 5,000 images, never trained on) and report
the held-out top-1 and the wall time of the whole `pixformer train` command (data from the decoded
cache, its validations included), with the CPU's model name and the exact command. A recipe that
evaluates with the mirrored view (--eval-flip) also gets its top-1 without it, after the clock stopped.

    .venv/bin/python scripts/speedrun_cifar10.py                        # configs/cifar10-speedrun.yaml
    .venv/bin/python scripts/speedrun_cifar10.py --ablate --epochs 4 --train-subset 10000 \
        --options "--progressive [16,24,32,32]"   # each ingredient taken out, at a small budget (4 epochs
                                                  # of 10,000 images; a side list as short as the epochs)
    .venv/bin/python scripts/speedrun_cifar10.py --config configs/cifar10-convmixer-2h.yaml --epochs 4 \
        --train-subset 10000 --options "--progressive null --warmup-epochs 1 --eval-every 0" \
        --variant "Muon=--optimizer muon" --out runs/convmixer-muon      # the recipe and a variant of it

--ablate trains the recipe and one variant per ingredient (each taken out or replaced by the plain
choice) at the same budget, one after the other, so the table says what each added. Results go to
OUT/results.json. A finished run is read back when asked for again with the same command; no run is
ever deleted: a different command for a finished run's folder is refused (give another --out), and
so is a stopped run's folder (resume it with pixformer train, or delete it to time a new run). Run
nothing else on the machine meanwhile: the wall times are the point.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

DATA = "../shared/data/cifar10-train-jpg.tar.gz"
# Each ingredient of the recipe, and the options that take it out (or put the plain choice in its place);
# the EMA, which the recipe leaves out, is put in.
ABLATIONS = {
    "recipe": [],
    "linear stem (no conv stem)": ["--stem", "linear"],
    "no crop / flip": ["--crop-padding", "0", "--hflip", "false"],
    "AdamW (not Muon)": ["--optimizer", "adamw"],
    "cosine schedule (not linear)": ["--lr-schedule", "cosine"],
    "no random erasing": ["--random-erase", "0"],
    "no drop path": ["--drop-path", "0"],
    "no progressive resizing": ["--progressive", "null"],
    "fp32 (not bf16 autocast)": ["--precision", "fp32"],
    "EMA 0.99 added": ["--ema-decay", "0.99"],
}


PIXFORMER = [sys.executable, "-m", "pixformer"]   # this interpreter's pixformer, installed or on PYTHONPATH


def run(folder: Path, config: str, data: str, extra: list[str]) -> dict:
    """Train `config` with `extra` options into `folder` (read back when finished with the same command):
    held-out top-1 (%), wall time, command."""
    done = folder / "speedrun.json"
    cmd = ["pixformer", "train", "--config", config, "--data", data, "--out", str(folder), "--progress", "false", *extra]
    if done.exists():
        finished = json.loads(done.read_text())
        if finished["command"] == shlex.join(cmd):
            return finished
        sys.exit(f"{folder} holds a finished run of another command ({finished['command']}): give another --out")
    if (folder / "checkpoint").exists() or (folder / "metrics.jsonl").exists():   # a timed run starts from scratch
        sys.exit(f"{folder} holds a stopped run: continue it with pixformer train --out {folder} --resume (its "
                 "wall time then no longer counts), or delete the folder to time a run from the start")
    start = time.time()
    code = subprocess.run([*PIXFORMER, *cmd[1:]]).returncode
    if code:
        sys.exit(f"pixformer train ended with exit code {code} (its message above); {folder} is kept")
    wall = time.time() - start
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "val_top1" in r]
    result = {"top1": 100 * epochs[-1]["val_top1"], "best_top1": 100 * max(r["val_top1"] for r in epochs),
              "epochs": epochs[-1]["epoch"], "wall_s": round(wall, 1), "command": shlex.join(cmd), "cpu": cpu_name(),
              "threads": os.environ.get("OMP_NUM_THREADS", f"{os.cpu_count()} cores"),
              "per_epoch_top1": {r["epoch"]: round(100 * r["val_top1"], 2) for r in epochs}}
    if json.loads((folder / "config.json").read_text())["task_args"].get("eval_flip"):   # after the clock stopped
        plain = subprocess.run([*PIXFORMER, "eval", "--checkpoint", str(folder),
                                "--split", "val", "--eval_flip", "false", "--json"], check=True, capture_output=True, text=True)
        result["top1_without_flip"] = 100 * json.loads(plain.stdout.strip().splitlines()[-1])["top1"]
    done.write_text(json.dumps(result, indent=1))
    return result


def cpu_name() -> str:
    from pixformer.engine import perf          # (imports torch: not before the options are checked)
    return perf.cpu_name()


def folder_name(variant: str) -> str:
    """A variant's run folder: its name's letters, digits, dots and dashes ('AdamW (not Muon)' -> 'AdamW-not-Muon')."""
    return re.sub(r"[^\w.]+", "-", variant).strip("-")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10-speedrun.yaml", help="the recipe")
    p.add_argument("--data", default=DATA, help="the CIFAR-10 training images (10 %% held out, seed 0); "
                   "cifar10: the official release, downloaded once")
    p.add_argument("--out", default="runs/speedrun", help="a run folder per run, and results.json")
    p.add_argument("--ablate", action="store_true", help="also train one variant per ingredient")
    p.add_argument("--epochs", type=int, default=None, help="the budget (default: the recipe's)")
    p.add_argument("--train-subset", type=int, default=None, help="train on a seeded subset of this many images")
    p.add_argument("--seed", type=int, default=None, help="the training seed (initialisation, order, augmentation; "
                   "default: the recipe's, 0); the held-out images stay the same")
    p.add_argument("--ema-decay", type=float, default=None, help="the EMA decay of every run (default: the recipe's; "
                   "a small budget needs a shorter average, e.g. 0.99 for a few hundred steps)")
    p.add_argument("--options", default="", help="training options for every run, after the budget (e.g. "
                   "\"--progressive null --warmup-epochs 1\" to fit a recipe to a small budget)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                   help="train the recipe and this variant too (repeatable; after --ablate's list with --ablate), "
                   "e.g. \"Muon=--optimizer muon\"")
    a = p.parse_args()
    names = [v.split("=", 1)[0].strip() for v in a.variant]
    if any("=" not in v for v in a.variant) or not all(names):
        sys.exit("--variant takes NAME=OPTIONS, e.g. \"Muon=--optimizer muon\"")
    taken = list(ABLATIONS if a.ablate else ["recipe"]) + names
    folders = [folder_name(n) for n in taken]
    if len(set(folders)) < len(folders):
        sys.exit(f"--variant names must differ from each other and from {', '.join(ABLATIONS if a.ablate else ['recipe'])} "
                 f"(in letters and digits): {', '.join(names)}")
    if a.data != "cifar10" and not Path(a.data).exists():
        sys.exit(f"{a.data} not found: give --data the CIFAR-10 archive, or cifar10 for the official release "
                 "(see docs/data.md#the-cifar-10-archive-of-these-pages)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = (["--epochs", str(a.epochs)] if a.epochs else []) + \
        (["--train-subset", str(a.train_subset)] if a.train_subset else []) + \
        (["--ema-decay", str(a.ema_decay)] if a.ema_decay is not None else []) + \
        (["--seed", str(a.seed)] if a.seed is not None else []) + shlex.split(a.options)   # (a variant's own after)
    tag = Path(a.config).stem + (f"-{a.epochs}ep" if a.epochs else "") + (f"-{a.train_subset}" if a.train_subset else "") \
        + (f"-ema{a.ema_decay}" if a.ema_decay is not None else "") + (f"-seed{a.seed}" if a.seed is not None else "")
    variants = ABLATIONS if a.ablate else {"recipe": []}
    variants = {**variants, **{name.strip(): shlex.split(opts) for name, opts in (v.split("=", 1) for v in a.variant)}}
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    print(f"CPU: {cpu_name()}", flush=True)
    for name, extra in variants.items():
        key = f"{tag}/{name}"
        folder = out / tag / folder_name(name)
        results[key] = run(folder, a.config, a.data, [*budget, *extra])
        r = results[key]
        plain = f"  ({r['top1_without_flip']:.2f} % without the mirrored view)" if "top1_without_flip" in r else ""
        print(f"{name:<38} top-1 {r['top1']:5.2f} %  wall {r['wall_s'] / 60:5.1f} min{plain}", flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    print(f"\n| {tag} | held-out top-1 | wall time |\n|---|---|---|")
    for name in variants:
        r = results[f"{tag}/{name}"]
        print(f"| {name} | {r['top1']:.2f} % | {r['wall_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
