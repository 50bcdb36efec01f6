"""Any-resolution inference: one trained model evaluated at several resolutions, NaViT's accuracy-vs-cost
curve. `pixformer eval --checkpoint RUN --resolutions 32,48,64` prints a table and writes
resolutions.json and resolutions.png.

At resolution r, a native-resolution run's images keep their aspect ratio with the longer side set to
r (sides in whole patches, packed as the run packed them); a square run's images are resized to r x r.
The position embedding takes the new grids as it was built to (models/vit.py). Cost per image: its
tokens and the model's forward GFLOPs at its grid (matmuls; models' `flops`), and images/s measured.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data.native import batcher_for
from ..data.augment import resize
from ..data.store import ImageSet, NativeSet
from ..engine.loop import evaluate
from ..engine.runtime import Runtime
from ..errors import PixformerError
from ..files import write_atomically
from ..models import token_layout
from ..tasks.base import Task
from ..tasks.figures import save_figure


def parse_resolutions(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise PixformerError(f"--resolutions takes whole pixel sizes separated by commas, e.g. 32,48,64; got {text!r}") from None
    if not values or min(values) < 1:
        raise PixformerError(f"--resolutions needs at least one size >= 1, got {text!r}")
    return values


def resolution_sweep(task: Task, model: nn.Module, state: dict, data_at: Callable[[int], ImageSet | NativeSet],
                     resolutions: list[int], batch_size: int, runtime: Runtime, amp) -> list[dict]:
    """One row per resolution: the task's metrics, mean tokens and GFLOPs per image, images/s, on the split
    `data_at(r)` gives for resolution r (a native-resolution run's: its images decoded at longest side r)."""
    p = model.cfg.patch_size
    base = batcher_for(state["train_config"], *token_layout(model), runtime.device)
    bad = [r for r in resolutions if r % p] if base is None else []
    if bad:
        raise PixformerError(f"resolution {bad[0]} is not a whole number of {p}-pixel patches")
    first = data_at(resolutions[0])
    warm = first.subset(torch.arange(min(len(first), batch_size)))
    evaluate(task, model, warm, batch_size, runtime, amp, batcher=base, desc=None)   # first-call costs out of the timings
    rows = []
    for r in resolutions:
        data = data_at(r)
        if base is not None:                                   # longer side r, aspect kept
            longest = max(r // p, 1) ** 2 + base.cls                 # a pack must hold the largest image
            batcher = replace(base, max_side=r, max_tokens=None, side=r,
                              pack_length=None if base.pack_length is None else max(base.pack_length, longest))
            grids = [batcher.grid(im) for im in data.images]
            scored = data
        else:
            batcher = None
            grids = [(r // p, r // p)] * len(data)
            scored = ImageSet(resize(data.images, (r, r)), data.labels, data.classes)
        t0 = time.perf_counter()
        metrics = evaluate(task, model, scored, batch_size, runtime, amp, batcher=batcher, desc=f"evaluating at {r} px")
        seconds = time.perf_counter() - t0
        n = len(grids)
        rows.append({"resolution": r, **{k: v for k, v in metrics.items()},
                     "tokens": sum(h * w for h, w in grids) / n,
                     "gflops": sum(model.flops((h * p, w * p)) for h, w in grids) / n / 1e9,
                     "img_per_s": n / seconds})
    return rows


def write_sweep(rows: list[dict], out: Path, metric: str, title: str) -> list[Path]:
    """resolutions.json and resolutions.png (the metric against GFLOPs per image, each point labelled
    with its resolution in pixels) in the folder `out` (checked with output_folder before the sweep)."""
    write_atomically(out / "resolutions.json", json.dumps(rows, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r["gflops"] for r in rows], [r[metric] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"{r['resolution']} px", (r["gflops"], r[metric]), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8)
    ax.margins(x=0.12, y=0.2)                      # room for the first and last points' labels inside the axes
    ax.set_xlabel("GFLOPs per image (forward)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "resolutions.png")
    return [out / "resolutions.json", out / "resolutions.png"]


def format_rows(rows: list[dict], metric: str) -> str:
    lines = [f"{'res':>5} {metric:>8} {'tokens':>8} {'GFLOPs':>8} {'img/s':>8}"]
    lines += [f"{r['resolution']:>5} {r[metric]:>8.4f} {r['tokens']:>8.1f} {r['gflops']:>8.4f} {r['img_per_s']:>8.1f}"
              for r in rows]
    return "\n".join(lines)
