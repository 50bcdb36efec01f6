"""The main job: does a Transformer need patches? On the bundled digits, train the same model with
patch sizes 4, 2 and 1 (the Pixel Transformer), nothing else changed, and compare."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..engine.config import TrainConfig
from ..engine.loop import prepare_data, train
from .tables import plot, sampling_noise

PATCHES = (4, 2, 1)
# The shared recipe: a 4-layer, 64-wide ViT trained for 120 epochs on 8x8 digits (1,438 training
# images; pixformer's fixed 359-image test split), batch 32, AdamW at 1e-3 with cosine decay, no
# augmentation. Every patch size gets exactly these settings. Pixel tokens learn slowly at first
# (a long plateau while position is discovered), which is why the schedule is long for such data:
# PiT ended at 96.9-97.5 % after 80 epochs (seeds 0-1, MKL or oneDNN GEMMs), at 97.2-98.1 % after 120.
# fp32 on every machine (--precision auto would pick bf16 where the CPU has it), so the recipe computes
# the same thing on any CPU: the model is small enough for fp32 to take a few minutes.
DEMO_RECIPE = dict(data="digits", model_args=dict(depth=4, dim=64, heads=4), epochs=120, batch_size=32, lr=1e-3,
                   precision="fp32", progress=False)


def run_demo(out: str | None = None, seed: int = 0, train_subset: int | None = None, epochs: int | None = None,
             progress: bool = False) -> tuple[Path, list[dict]]:
    out_dir = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = TrainConfig(**{**DEMO_RECIPE, "seed": seed, "train_subset": train_subset, "progress": progress,
                          **({"epochs": epochs} if epochs else {})})
    data = prepare_data(base)
    img = data.facts.img_size
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
                     "gflops": model.flops() / 1e9, "accuracy": result["test_top1"], "n": result["test_n"],
                     "val_accuracy": result["val_top1"], "seconds": round(time.time() - t0, 1)})
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
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
            f"standard errors of a difference at n={n}; one image is {100 / n:.2f} %). One seed: the seed moves "
            "each patch size by about as much.")
