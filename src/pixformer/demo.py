"""The main job: does a Transformer need patches? On the bundled digits, train the same model with
patch sizes 4, 2 and 1 (the Pixel Transformer), nothing else changed, and compare."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .registry import create_model
from .train import TrainConfig, prepare_data, train

PATCHES = (4, 2, 1)
# The shared recipe: a 4-layer, 64-wide ViT trained for 120 epochs on 8x8 digits (1,438 training
# images; pixformer's fixed 359-image test split), batch 32, AdamW at 1e-3 with cosine decay, no
# augmentation. Every patch size gets exactly these settings. Pixel tokens learn slowly at first
# (a long plateau while position is discovered), which is why the schedule is long for such data:
# PiT ended at 96.9-97.5 % after 80 epochs (seeds 0-1, MKL or oneDNN GEMMs), at 97.2-98.1 % after 120.
# fp32 on every machine (--precision auto would pick bf16 where the CPU has it), so the recipe computes
# the same thing on any CPU: the model is small enough for fp32 to take a few minutes.
DEMO_RECIPE = dict(data="digits", depth=4, dim=64, heads=4, epochs=120, batch_size=32, lr=1e-3, precision="fp32",
                   progress=False)


# A table column: (header, row key, width, format spec of the value).
TABLE_COLUMNS = [("patch", "patch", 5, ""), ("tokens", "tokens", 6, ""), ("params", "params", 8, ","),
                 ("GFLOPs", "gflops", 8, ".4f"), ("test acc", "accuracy", 9, ".2%"), ("seconds", "seconds", 8, ".1f")]


def format_table(rows: list[dict], columns: list[tuple[str, str, int, str]] = TABLE_COLUMNS,
                 markdown: bool = False) -> str:
    """Rows as an aligned text table, or a markdown table."""
    cells = [[f"{r[key]:>{width}{spec}}" for _, key, width, spec in columns] for r in rows]
    head = [f"{name:>{width}}" for name, _, width, _ in columns]
    if markdown:
        rule = ["-" * (len(h) - 1) + ":" for h in head]
        return "\n".join("| " + " | ".join(line) + " |" for line in [head, rule, *cells])
    header = " ".join(head)
    return "\n".join([header, "-" * len(header), *(" ".join(c) for c in cells)])


def plot(rows: list[dict], path: Path, title: str, x: str = "patch", xlabel: str = "patch size (pixels per side)",
         ylabel: str = "test accuracy (%)"):
    """Accuracy against patch size (log scale, smallest patch on the right). Each point is labelled with
    row["note"] (default: its token count); row["std"], where given, draws an error bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    xs = [r[x] for r in rows]
    ax.errorbar(xs, [100 * r["accuracy"] for r in rows], yerr=[100 * r.get("std", 0.0) for r in rows],
                fmt="o-", capsize=3)
    for r in rows:
        ax.annotate(r.get("note", f"{r['tokens']} tokens"), (r[x], 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.08, y=0.15)  # room for the point labels
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(out: str | None = None, seed: int = 0, train_subset: int | None = None, epochs: int | None = None,
             progress: bool = False) -> tuple[Path, list[dict]]:
    out_dir = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = TrainConfig(**{**DEMO_RECIPE, "seed": seed, "train_subset": train_subset, "progress": progress,
                          **({"epochs": epochs} if epochs else {})})
    data = prepare_data(base)
    img = tuple(data.train.images.shape[-2:])
    rows = []
    for p in PATCHES:
        name = "pit-n" if p == 1 else f"vit-n/{p}"
        cfg = dataclasses.replace(base, model=name, out=str(out_dir / name.replace("/", "")), resume=True)
        print(f"training {name} (patch {p}) ...", flush=True)
        t0 = time.time()
        result = train(cfg, data)
        model = result["model"]
        rows.append({"patch": p, "model": name, "tokens": (img[0] // p) * (img[1] // p),
                     "params": sum(q.numel() for q in model.parameters()),
                     "gflops": model.flops() / 1e9, "accuracy": result["top1"],
                     "seconds": round(time.time() - t0, 1)})
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out_dir / "accuracy_vs_patch.png",
         f"digits 8x8, same ViT ({base.depth}x{base.dim}), {base.epochs} epochs")
    return out_dir, rows
