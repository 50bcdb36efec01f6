"""The main job: does a Transformer need patches? On the bundled digits, train the same model with
patch sizes 4, 2 and 1 (the Pixel Transformer), nothing else changed, and compare."""
from __future__ import annotations

import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..engine.config import TrainConfig
from ..engine.loop import default_run_dir, train
from ..errors import PixformerError
from ..files import output_folder, write_atomically
from ..models.registry import create_model, model_name
from .tables import binomial_se, plot, sampling_noise

PATCHES = (4, 2, 1)
# The shared recipe: a 4-layer, 64-wide ViT on 8x8 digits (1,294 training images after the 10 %
# validation hold-out; pixformer's fixed 359-image test split is scored once at the end), batch 16,
# 60 epochs, AdamW at 1e-3 with 3 warm-up epochs and cosine decay, weight EMA 0.998, no augmentation.
# Every patch size gets exactly these settings. It takes as many steps as the earlier recipe (batch
# 32, 120 epochs) on half the images. PiT's test accuracy moves with the seed, the thread count and
# the GEMM library (scripts/demo_variants.py, one thread, oneDNN GEMMs: 97.2 / 96.9 % for seeds 0 / 1;
# `pixformer demo` with two threads per model: 97.8 % with oneDNN, 95.8 % with MKL; one thread, MKL:
# 95.0 %). Variants tried and dropped (scripts/demo_variants.py): no EMA 96.7 / 97.2 %, batch 8 for 30
# epochs 90.3 %, mixup 0.8 for 40 epochs 93.0 / 89.1 %, a 1-pixel random crop 42.3 % (it defeats a
# learned position table at 8x8).
# fp32 on every machine (--precision auto would pick bf16 where the CPU has it), so the recipe computes
# the same thing on any CPU.
DEMO_RECIPE = dict(data="digits", model_args=dict(depth=4, dim=64, heads=4), epochs=60, batch_size=16, lr=1e-3,
                   warmup_epochs=3.0, ema_decay=0.998, precision="fp32", progress=False)


def _stop_with_parent() -> None:
    """In a pool worker: receive SIGTERM when the demo's process dies (Linux), so a killed demo leaves
    no training behind; the run checkpoints at its next step and stops."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def train_point(cfg: TrainConfig, threads: int, parent: int) -> dict:
    """One patch size of the demo, in a process of its own: its row of the table (none, and the worker
    ends, when the demo's process `parent` is gone)."""
    if os.getppid() != parent:
        raise SystemExit(0)
    torch.set_num_threads(threads)
    t0 = time.time()
    try:
        result = train(cfg)
    except PixformerError:
        if os.getppid() != parent:      # stopped because the demo died: the checkpoint is saved, end here
            os._exit(1)
        raise
    model, p = result["model"], result["model"].cfg.patch_size
    img = model.cfg.img_size
    return {"patch": p, "model": result["model_name"], "tokens": (img[0] // p) * (img[1] // p),
            "params": sum(q.numel() for q in model.parameters()), "gflops": model.flops() / 1e9,
            "accuracy": result["test_top1"], "n": result["test_n"], "val_accuracy": result["val_top1"],
            "std": binomial_se(result["test_top1"], result["test_n"]), "seconds": round(time.time() - t0, 1)}


def run_demo(out: str | None = None, seed: int = 0, train_subset: int | None = None, epochs: int | None = None,
             progress: bool = False) -> tuple[Path, list[dict]]:
    """Train the recipe at every patch size, each in a process of its own, as many at a time as there
    are cores (at most three; the longest, PiT, first), the cores shared out among them (one thread
    each on 2 cores): these models are too small for two threads to help one of them as much as two
    processes do. Each run folder resumes if stopped."""
    base = TrainConfig(**{**DEMO_RECIPE, "seed": seed, "train_subset": train_subset, "progress": progress,
                          **({"epochs": epochs} if epochs is not None else {})})     # checked before any folder
    out_dir = output_folder(Path(out) if out else default_run_dir("demo"))
    cores = os.cpu_count() or 1
    workers = min(len(PATCHES), cores)
    jobs = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_stop_with_parent) as pool:
        for p in sorted(PATCHES):                          # patch 1 first: the longest run starts at once
            name = "pit-n" if p == 1 else f"vit-n/{p}"
            cfg = dataclasses.replace(base, model=name, out=str(out_dir / name.replace("/", "")), resume=True)
            with torch.device("meta"):                     # the name its epoch lines print (the demo's sizes)
                built = model_name(create_model(name, img_size=8, **base.model_args))
            print(f"training {built} (patch {p}) in {out_dir / name.replace('/', '')} ...", flush=True)
            jobs[p] = pool.submit(train_point, cfg, max(cores // workers, 1), os.getpid())
        rows = [jobs[p].result() for p in PATCHES]
    write_atomically(out_dir / "results.json", json.dumps(rows, indent=1))
    plot(rows, out_dir / "accuracy_vs_patch.png", f"digits 8x8, same ViT ({base.model_args['depth']}x"
         f"{base.model_args['dim']}), {base.epochs} epochs, seed {seed}", footnote=noise_note(rows))
    return out_dir, rows


def noise_note(rows: list[dict]) -> str:
    """Whether the patch sizes' test accuracies differ by more than test-set sampling noise."""
    accs = [r["accuracy"] for r in rows]
    n = rows[0]["n"]
    spread, noise = max(accs) - min(accs), sampling_noise(sum(accs) / len(accs), n)
    verdict = "within" if spread <= noise else "beyond"
    return (f"Spread {100 * spread:.2f} points: {verdict} test-set sampling noise ({100 * noise:.2f} points, two "
            f"standard errors of a difference at n={n}; one image is {100 / n:.2f} %; error bars: one standard "
            "error). One seed: the seed moves PiT by up to 3 points (DEMO_RECIPE).")
