"""`pixformer sweep`: the PiT paper's patch-size study (arXiv 2406.09415), cached point by point.

Two regimes:
    fixed-input   one input size, patch 8 -> 4 -> 2 -> 1: the sequence grows 4x per halving
    fixed-tokens  one token count, the input shrinks with the patch (32x32 p=4, 16x16 p=2, 8x8 p=1: 64 tokens)

Every point trains the same recipe (the `train` settings) once per seed, in a run folder of its own:

    OUT/sweep.json                the sweep's settings
    OUT/p4-32x32/seed0/           an ordinary run folder (checkpoint/, metrics.jsonl), result.json once done
    OUT/results.csv, results.md   one row per point: accuracy mean ± std over seeds, cost, wall time
    OUT/accuracy_vs_patch_<regime>.png

A finished point is read back from its result.json and an interrupted one resumes from its checkpoint,
so re-running the same command continues a sweep where it stopped. Every point is checked (geometry,
model settings, data) before the first one trains.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.checkpoint import find_checkpoint
from ..engine.config import TrainConfig, changed_settings, config_from_options
from ..engine.loop import Prepared, Stopped, default_run_dir, prepare_data, train
from ..errors import PixformerError
from ..files import output_folder, read_json_object, write_atomically
from ..models.registry import VIT_SIZES, create_model
from ..models.registry import model_name as built_name
from ..tasks import get_task, task_config
from .tables import format_table, plot

REGIMES = ("fixed-input", "fixed-tokens")
# TrainConfig fields (and the patch_size model setting) the sweep sets for each point: not its options
PER_POINT = ("model", "out", "seed", "resume", "img_size", "patch_size")


@dataclass
class SweepConfig:
    """A patch-size sweep: the grid (regime, patches, img_size or tokens, size or model, seeds) and the
    training recipe every point shares (`train`)."""
    regime: str = "fixed-input"          # fixed-input | fixed-tokens
    patches: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # the patch sizes of the points
    img_size: int | None = None          # fixed-input: the input size (default: the data's own)
    tokens: int | None = None            # fixed-tokens: tokens per image (default: (img_size / largest patch)^2)
    size: str = "n"                      # model size letter: vit-<size>/<p>, and pit-<size> for p = 1
    model: str | None = None             # or sweep this model's patch_size setting (e.g. convmixer-256/8)
    seeds: list[int] = field(default_factory=lambda: [0])  # each point trains once per seed
    out: str | None = None               # the sweep folder (default runs/sweep-<regime>-<data>-<time>)
    train: TrainConfig = field(default_factory=TrainConfig)  # the recipe every point shares; PER_POINT fields are set per point

    def __post_init__(self):
        """What needs no data, checked before any is read (the points' sizes are checked against the data's)."""
        if self.regime not in REGIMES:
            raise PixformerError(f"regime must be one of {REGIMES}, got {self.regime!r}")
        if not self.patches or any(p < 1 for p in self.patches) or len(set(self.patches)) != len(self.patches):
            raise PixformerError(f"patches must be distinct sizes >= 1, got {self.patches}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise PixformerError(f"seeds must be a non-empty list of distinct seeds, got {self.seeds}")
        if self.model is None and self.size not in VIT_SIZES:
            raise PixformerError(f"size must be one of {list(VIT_SIZES)}, got {self.size!r}")
        if self.train.img_size is not None or "patch_size" in self.train.model_args:
            raise PixformerError("the sweep chooses each point's img_size and patch_size; set the sweep's "
                                 "img_size / patches instead of the train settings'")


@dataclass
class Point:
    """One point of the grid: a model at a patch size and input size, with its cost."""
    patch: int
    img: tuple[int, int]        # input size (H, W)
    resize: int | None          # TrainConfig.img_size of the point (None: the data's own size)
    model: str                  # the name the point's model is made from (vit-n/4; --model)
    tokens: int
    params: int
    flops: int
    built: str = ""             # the name of the model built, after every setting (vit-d2w32/4): the rows' label

    @property
    def name(self) -> str:
        return f"p{self.patch}-{self.img[0]}x{self.img[1]}"


def sweep_config(values: dict[str, Any]) -> SweepConfig:
    """A SweepConfig from the flat options of `pixformer sweep` (its own fields and the train fields)."""
    own = {f.name for f in dataclasses.fields(SweepConfig)} - {"train"}
    return SweepConfig(**{k: values[k] for k in own if k in values},
                       train=config_from_options(values, skip=own | set(PER_POINT)))


# ---- the grid --------------------------------------------------------------------------------
def point_geometry(cfg: SweepConfig, native: tuple[int, int]) -> list[tuple[int, tuple[int, int]]]:
    """(patch, input size) of every point, or a PixformerError naming the first invalid one."""
    base = (cfg.img_size, cfg.img_size) if cfg.img_size else tuple(native)
    if cfg.regime == "fixed-input":
        if cfg.tokens is not None:
            raise PixformerError("--tokens sets the fixed-tokens regime's sequence length; "
                                 "the fixed-input regime takes --img-size")
        for p in cfg.patches:
            if base[0] % p or base[1] % p:
                raise PixformerError(f"invalid sweep point patch {p} at input {base[0]}x{base[1]}: "
                                     f"{base[0]}x{base[1]} is not divisible by {p}")
        return [(p, base) for p in cfg.patches]
    if cfg.tokens is None:
        biggest = max(cfg.patches)
        if base[0] != base[1] or base[0] % biggest:
            raise PixformerError(f"cannot derive a token count from input {base[0]}x{base[1]} and patch {biggest}; "
                                 "give --tokens (a square number, e.g. 64)")
        tokens = (base[0] // biggest) ** 2
    else:
        tokens = cfg.tokens
    side = math.isqrt(max(tokens, 0))
    if tokens < 1 or side * side != tokens:
        raise PixformerError(f"invalid sweep point: no square input gives {tokens} tokens at any patch size "
                             f"(the token count must be a square, e.g. {max(side, 1) ** 2} or {(side + 1) ** 2})")
    return [(p, (side * p, side * p)) for p in cfg.patches]


def model_name(cfg: SweepConfig, patch: int) -> str:
    if cfg.model:
        return cfg.model
    return f"pit-{cfg.size}" if patch == 1 else f"vit-{cfg.size}/{patch}"


def point_config(cfg: SweepConfig, point: Point, seed: int, out_dir: Path) -> TrainConfig:
    """The training run of one point and seed."""
    model_args = {**cfg.train.model_args, **({"patch_size": point.patch} if cfg.model else {})}
    return dataclasses.replace(cfg.train, model=point.model, img_size=point.resize, seed=seed, resume=True,
                               model_args=model_args, out=str(out_dir / point.name / f"seed{seed}"))


def plan(cfg: SweepConfig, native: tuple[int, int], in_chans: int, num_classes: int) -> list[Point]:
    """Every point of the sweep, each model built (without memory) to check its settings and count its cost.
    `native`: the data's own image size (used where the sweep's img_size is unset)."""
    points = []
    for p, img in point_geometry(cfg, native):
        resize = None if cfg.img_size is None and img == tuple(native) else img[0]  # None: the data as it is
        point = Point(p, img, resize, model_name(cfg, p), 0, 0, 0)
        try:
            run = point_config(cfg, point, cfg.seeds[0], Path("."))
            with torch.device("meta"):
                model = create_model(run.model, img_size=img, num_classes=num_classes, in_chans=in_chans, **run.model_args)
        except PixformerError as e:
            raise PixformerError(f"invalid sweep point {point.name} ({point.model}): {e}") from None
        point.tokens = (img[0] // p) * (img[1] // p)
        point.params = sum(t.numel() for t in model.parameters())
        point.flops = model.flops()
        point.built = built_name(model)
        points.append(point)
    return points


# ---- running ---------------------------------------------------------------------------------
def _check_cached(run_dir: Path, cfg: TrainConfig):
    """A run folder left by an earlier sweep must hold the same recipe, or its results would be mixed in."""
    saved = run_dir / "config.json"
    if not saved.exists():
        return
    changed = changed_settings(read_json_object(saved, "a run's settings"), cfg)
    if changed:
        changes = ", ".join(changed[:4])
        raise PixformerError(f"{run_dir} was trained with other settings ({changes}); "
                             "use another --out for a different sweep, or delete that folder")


def run_point(cfg: TrainConfig, data: Prepared) -> dict[str, Any]:
    """Train one point and seed (resuming a checkpoint), or read back its result when it finished before."""
    run_dir = Path(cfg.out)
    done = run_dir / "result.json"
    if done.exists():
        return {**read_json_object(done, "a sweep point's result"), "cached": True}
    resumed = find_checkpoint(run_dir) is not None
    t0 = time.time()
    result = train(dataclasses.replace(cfg, resume=resumed), data)
    split = "test" if "test_top1" in result else "val"   # the test split when the data has one
    record = {"top1": result[f"{split}_top1"], "top5": result[f"{split}_top5"], "loss": result[f"{split}_loss"],
              "step": result["step"], "split": split}
    record.update(seconds=round(time.time() - t0, 1), resumed=resumed)
    write_atomically(done, json.dumps(record, indent=1))      # a kill leaves no half-written result
    return {**record, "cached": False}


def summarize(point: Point, records: list[dict], regime: str) -> dict[str, Any]:
    accs = [r["top1"] for r in records]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    mean = statistics.fmean(accs)
    acc = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if len(accs) > 1 else "")
    return {"model": point.built or point.model, "patch": point.patch, "input": f"{point.img[0]}x{point.img[1]}",
            "tokens": point.tokens, "params": point.params, "gflops": point.flops / 1e9,
            "accuracy": mean, "std": std, "acc": acc, "seeds": len(accs),
            "accuracies": " ".join(f"{a:.4f}" for a in accs), "split": records[0]["split"],
            "seconds": statistics.fmean(r["seconds"] for r in records),
            "note": f"{point.tokens} token{'s' * (point.tokens > 1)}" if regime == "fixed-input"
            else f"{point.img[0]}x{point.img[1]} input"}


def columns(split: str) -> list[tuple[str, str, int, str]]:
    return [("model", "model", 15, ""), ("patch", "patch", 5, ""), ("input", "input", 7, ""),
            ("tokens", "tokens", 6, ""), ("params", "params", 10, ","), ("GFLOPs", "gflops", 9, ".3g"),
            (f"{split} acc %", "acc", 14, ""), ("seeds", "seeds", 5, ""), ("s/run", "seconds", 7, ".1f")]


def write_outputs(out_dir: Path, cfg: SweepConfig, rows: list[dict]):
    """results.csv, results.md and the plot, from the points finished so far."""
    keys = ["model", "patch", "input", "tokens", "params", "gflops", "split", "accuracy", "std", "seeds",
            "accuracies", "seconds"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(out_dir / "results.csv", table.getvalue())
    split = rows[0]["split"]
    write_atomically(out_dir / "results.md", format_table(rows, columns(split), markdown=True) + "\n")
    t = cfg.train
    pos = t.model_args.get("pos_embed")
    variant = [f"pos {pos}"] * bool(pos) + ["permuted pixels"] * t.permute_pixels + \
        [f"{t.local_swaps} swaps δ={t.swap_distance or '∞'}"] * bool(t.local_swaps)
    title = ", ".join([Path(t.data).name, cfg.regime, *variant, f"{t.epochs} epochs",
                       f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}"])
    plot(rows, plot_path(out_dir, cfg.regime), title, ylabel=f"{split} accuracy (%)")


def plot_path(out_dir: Path, regime: str) -> Path:
    """The sweep's figure: accuracy against patch size."""
    return out_dir / f"accuracy_vs_patch_{regime}.png"


def run_sweep(cfg: SweepConfig) -> tuple[Path, list[dict]]:
    """Check every point, then train the ones not yet done; returns the sweep folder and one row per point."""
    t = cfg.train
    metric, _ = get_task(t.task).best
    if metric != "top1":                                   # before any data is read or point trained
        raise PixformerError(f"the sweep compares top-1 accuracy across patch sizes; --task {t.task} measures "
                             f"{metric}, not accuracy: train each patch size with pixformer train --task {t.task}")
    t.speed.check()                                        # the shared settings too, before any data is read
    task_config(t.task, t.task_args)
    out_dir = Path(cfg.out) if cfg.out else default_run_dir("sweep", cfg.regime, data=t.data)
    if out_dir.is_file():                                  # (made, and checked writable, once every point is checked)
        raise PixformerError(f"{out_dir} is a file, not a folder: choose another --out")
    # the data at its own (or the sweep's) size: the grid's reference, its channels and classes
    first_seed = cfg.seeds[0]
    ref = prepare_data(dataclasses.replace(t, img_size=cfg.img_size, seed=first_seed))
    points = plan(cfg, ref.facts.img_size, ref.facts.in_chans, len(ref.facts.classes))

    # data decoded once per distinct input size (and per seed when the seed picks a training subset)
    datasets: dict[tuple, Prepared] = {(cfg.img_size, first_seed): ref}
    runs = []
    for point in points:
        for seed in cfg.seeds:
            run_cfg = point_config(cfg, point, seed, out_dir)
            _check_cached(Path(run_cfg.out), run_cfg)
            key = (run_cfg.img_size, seed if t.train_subset else first_seed)
            if key not in datasets:
                datasets[key] = prepare_data(run_cfg)
            runs.append((point, seed, run_cfg, datasets[key]))

    output_folder(out_dir)
    write_atomically(out_dir / "sweep.json", json.dumps(dataclasses.asdict(cfg), indent=1))
    print(f"sweep: {len(points)} points x {len(cfg.seeds)} seed(s) in {out_dir}", flush=True)
    records: dict[str, list[dict]] = {}
    rows: list[dict] = []
    for i, (point, seed, run_cfg, data) in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {point.built} patch {point.patch}, {point.img[0]}x{point.img[1]}, seed {seed}"
        print(f"{label} ...", flush=True)
        try:
            record = run_point(run_cfg, data)
        except Stopped as e:                                 # asked to stop: the same exit, the sweep's command
            raise Stopped(f"sweep stopped at {point.name} seed {seed}: {str(e).split('; ')[0]}; re-run the same "
                          f"sweep command with --out {out_dir} to continue where it stopped",
                          "SIGINT" if e.exit_code == 130 else "SIGTERM") from None
        except PixformerError as e:
            raise PixformerError(f"sweep stopped at {point.name} seed {seed}: {e}; re-run the same sweep "
                                 f"command with --out {out_dir} to continue where it stopped") from None
        how = "cached" if record["cached"] else ("resumed, " if record["resumed"] else "") + f"{record['seconds']:.1f} s"
        print(f"{label}: {record['split']} top1 {record['top1']:.4f} ({how})", flush=True)
        records.setdefault(point.name, []).append(record)
        if len(records[point.name]) == len(cfg.seeds):
            rows.append(summarize(point, records[point.name], cfg.regime))
            write_outputs(out_dir, cfg, rows)
    return out_dir, rows
