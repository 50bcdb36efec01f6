"""The data layer at scale: decoding an image folder, and a mapped training set's memory per rank.

    (a) decode     images/s decoding a synthetic folder of JPEGs (written here: --images, 64x64,
                   random but smooth) into the decode cache with 1 worker and with every core, each
                   into a fresh cache (PIXFORMER_CACHE), so each really decodes. Timed: load_source,
                   folder scan and fingerprint included. Target: >= 1.8x with 2 cores.
    (b) memory     a training set of >= 1 GB mapped by torchrun ranks (1 process, then 2): the same
                   synthetic JPEGs decoded at --size x --size (--images x 3 x size^2 bytes), and a tiny
                   set of --tiny images at the same size. Each rank runs load_source + resolve_splits
                   + channel_stats + --batches batches of 256 rows (train.images[idx]), or trains a small
                   ViT with `pixformer.train` (an epoch of the large set, as many steps on the tiny
                   one: the allocator keeps a run's busiest step), and reports its anonymous memory (RssAnon,
                   /proc/self/status). The large set may add at most 10 % of its size over the tiny
                   one, per rank. Both sets are decoded by this script first, so the ranks measure
                   mapping, not decoding.

    (c) data wait  PiT-T at 32x32 trained on CPU from CIFAR-10's JPEGs (../shared/data, mapped after the
                   first decode; random crop and flip on): the share of step time the loop waits for a
                   batch (metrics.jsonl's data_wait), batches made ahead on loader threads against each
                   made on the step's thread (--prefetch 0). Target: <= 5 %.
    (d) checkpoint FSDP2 ViT-B/8 (32x32 images) on 2 torchrun ranks, after one AdamW step: the peak
                   resident memory (VmHWM, reset before) a checkpoint adds on each rank, gathering the
                   full state on every rank (how checkpoints were taken before: DTensor.full_tensor() of
                   every weight and moment) against gathering to rank 0 alone on its CPU (today's
                   Runtime.checkpoint_state), each in a fresh pair of processes.

One command runs the parts asked (--parts, default all), prints a table each, names the CPU, and
writes benchmarks/results/data_scale.json (parts not run keep their earlier figures there). --small
is a quick correctness run at tiny sizes (figures not meaningful; written to data_scale-small.json).

    .venv/bin/python benchmarks/data_scale.py                 # parts a to d, full size (minutes)
    .venv/bin/python benchmarks/data_scale.py --parts b       # one part
    .venv/bin/python benchmarks/data_scale.py --small         # does it work

The rank side of parts (b) and (d) is this file again, launched by torchrun with --rank-worker
or --checkpoint-worker.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pixformer.engine import perf

RESULTS = Path(__file__).parent / "results"


# ---- shared --------------------------------------------------------------------------------------------
def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def synthetic_folder(root: Path, n: int, side: int = 64, classes: int = 10, seed: int = 0) -> Path:
    """n JPEGs (side x side, random but smooth: 4x4 random colours upsampled, a little noise) in
    `classes` class folders under root; written once (a folder already complete is reused)."""
    import numpy as np
    from PIL import Image
    done = root / f".complete-{n}-{side}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((side, side), Image.BILINEAR)
        arr = np.asarray(small, dtype=np.int16) + rng.integers(-8, 9, (side, side, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / f"class{i % classes:02d}" / f"{i:06d}.jpg",
                                                               quality=90)
    done.touch()
    print(f"wrote {n:,} {side}x{side} JPEGs to {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ---- (a) decoding throughput ---------------------------------------------------------------------------
def part_a(args, work: Path) -> dict:
    """Decode images/s with 1 worker and with every core, each into a fresh cache."""
    from pixformer.data.sources import load_source, source_fingerprint
    folder = synthetic_folder(work / "jpegs", args.images)
    t0 = time.perf_counter()
    source_fingerprint(folder)                        # the folder scan every load does, decoding or not
    scan = time.perf_counter() - t0
    rows = []
    for label, workers in (("1 worker", 1), (f"all cores ({cores()})", None)):
        os.environ["PIXFORMER_CACHE"] = str(work / f"cache-a-{workers or 'all'}")
        t0 = time.perf_counter()
        found = load_source(str(folder), workers=workers)
        seconds = time.perf_counter() - t0
        n = sum(len(s) for s in found.values())
        rows.append({"config": label, "workers": workers or cores(), "images": n, "load_s": round(seconds, 2),
                     "scan_s": round(scan, 2), "images_per_s": round(n / seconds),
                     "decode_images_per_s": round(n / max(seconds - scan, 1e-9))})
        shutil.rmtree(work / f"cache-a-{workers or 'all'}", ignore_errors=True)
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    decode_speedup = rows[1]["decode_images_per_s"] / rows[0]["decode_images_per_s"]
    rows[1]["speedup"], rows[1]["decode_speedup"] = round(speedup, 2), round(decode_speedup, 2)
    print(table(rows, ["config", "images", "load_s", "scan_s", "images_per_s", "decode_images_per_s", "speedup",
                       "decode_speedup"]))
    print(f"speedup with {cores()} cores: {speedup:.2f}x end to end, {decode_speedup:.2f}x decoding (the load less "
          "the folder scan, measured apart); target >= 1.8x on 2 cores")
    return {"images": args.images, "image_side": 64, "format": "JPEG quality 90", "rows": rows,
            "speedup": round(speedup, 2), "decode_speedup": round(decode_speedup, 2), "target_2_cores": 1.8}


# ---- (b) anonymous memory per rank of a mapped training set ---------------------------------------------
def rank_worker(args) -> None:
    """One torchrun rank: load, split, normalise and gather batches as training does; report memory."""
    def status() -> dict:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
        return out
    import torch

    from pixformer.data.sources import load_source
    from pixformer.data.splits import channel_stats, resolve_splits
    before = status()
    found = load_source(args.data, img_size=(args.size, args.size), workers=1)
    splits = resolve_splits(found, 0.1, args.data)
    if args.via == "train":        # a whole epoch of a small ViT through the training loop, as a user runs it
        from pixformer import TrainConfig, train
        epochs = max(1, round(args.steps_of / len(splits.train)))   # the tiny set: as many steps as the large
        train(TrainConfig(model="vit-n/16", data=args.data, img_size=args.size, model_args=dict(depth=1, dim=32),
                          epochs=epochs, batch_size=64, eval_batch_size=64, precision="fp32", progress=False,
                          out=args.out_dir))        # the same batches and steps for both sets: what differs is the data
    else:
        mean, std = channel_stats(splits.train.images)
        g = torch.Generator().manual_seed(int(os.environ.get("RANK", 0)))
        touched = 0.0
        for _ in range(args.batches):
            idx = torch.randint(0, len(splits.train), (256,), generator=g)
            touched += float(splits.train.images[idx].float().mean())
    after = status()
    rank = int(os.environ.get("RANK", 0))
    Path(f"{args.out_dir}.rank{rank}.json").write_text(json.dumps({   # a file each: ranks' prints interleave
        "rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)), "images": len(splits.train) + len(splits.val),
        "dataset_bytes": splits.train.images.nbytes + splits.val.images.nbytes, "before": before, "after": after}))


def run_ranks(folder: Path, size: int, nproc: int, batches: int, via: str, out_dir: Path, steps_of: int) -> list[dict]:
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, "--rank-worker", "--data", str(folder), "--size", str(size), "--batches", str(batches),
           "--via", via, "--out-dir", str(out_dir), "--steps-of", str(steps_of)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(f"torchrun failed:\n{done.stderr[-3000:]}")
    return [json.loads(Path(f"{out_dir}.rank{r}.json").read_text()) for r in range(nproc)]


def part_b(args, work: Path) -> dict:
    """RssAnon per rank after loading a >= 1 GB mapped set against a tiny one, 1 and 2 processes."""
    from pixformer.data.sources import load_source
    os.environ["PIXFORMER_CACHE"] = str(work / "cache-b")
    sets = {"tiny": synthetic_folder(work / "tiny", args.tiny, seed=1),
            "large": synthetic_folder(work / "jpegs", args.images)}
    for name, folder in sets.items():                 # decoded here, once: the ranks map
        load_source(str(folder), img_size=(args.size, args.size))
    rows, checks = [], []
    for via, nproc in ((v, n) for v in ("batches", "train") for n in (1, 2)):
        got = {name: run_ranks(folder, args.size, nproc, args.batches, via, work / "run-b", round(0.9 * args.images))
               for name, folder in sets.items()}
        for tiny, large in zip(got["tiny"], got["large"]):
            growth = large["after"]["RssAnon"] - tiny["after"]["RssAnon"]
            limit = 0.1 * large["dataset_bytes"]
            rows.append({"through": via, "processes": nproc, "rank": large["rank"],
                         "dataset_MiB": round(large["dataset_bytes"] / 2**20),
                         "RssAnon_tiny_MiB": round(tiny["after"]["RssAnon"] / 2**20, 1),
                         "RssAnon_large_MiB": round(large["after"]["RssAnon"] / 2**20, 1),
                         "growth_MiB": round(growth / 2**20, 1), "limit_MiB": round(limit / 2**20, 1),
                         "RssFile_large_MiB": round(large["after"]["RssFile"] / 2**20, 1),
                         "ok": growth <= limit})
            checks.append(growth <= limit)
    print(table(rows, ["through", "processes", "rank", "dataset_MiB", "RssAnon_tiny_MiB", "RssAnon_large_MiB",
                       "growth_MiB", "limit_MiB", "RssFile_large_MiB", "ok"]))
    print(f"every rank within 10 % of the dataset: {all(checks)}")
    return {"images": args.images, "tiny_images": args.tiny, "size": args.size, "batches": args.batches,
            "source": "synthetic 64x64 JPEG folder decoded at --size (load_source, resize in the decoder)",
            "through": {"batches": "load_source + resolve_splits + channel_stats + --batches gathers of 256 rows",
                        "train": "pixformer.train: vit-n/16 (1 block, width 32), batch 64 (also evaluation), fp32, "
                                 "default allocator policy and prefetching; one epoch of the large set, as many "
                                 "epochs of the tiny set as make the same number of steps"},
            "rows": rows, "ok": all(checks)}


# ---- (c) the share of step time spent waiting for data --------------------------------------------------
CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"


def part_c(args, work: Path) -> dict:
    """PiT-T 32x32 on CPU: data_wait (share of step time) with batches made ahead and without."""
    from pixformer import TrainConfig, train
    if not CIFAR.exists():
        sys.exit(f"part c trains on CIFAR-10's JPEGs: {CIFAR} is absent")
    os.environ["PIXFORMER_CACHE"] = str(work / "cache-c")
    rows = []
    for label, prefetch in (("on the step's thread (prefetch 0)", 0), ("made ahead (prefetch 4, 2 threads)", 4)):
        out = work / f"run-c-{prefetch}"
        cfg = TrainConfig(model="pit-t", data=str(CIFAR), img_size=32, train_subset=args.c_images,
                          batch_size=args.c_batch, epochs=1, val_fraction=0.002, crop_padding=4, hflip=True,
                          prefetch=prefetch, progress=False, out=str(out))
        train(cfg)
        row = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "data_wait" in line)
        steps = args.c_images // args.c_batch
        rows.append({"config": label, "steps": steps, "batch": args.c_batch, "img_per_s": round(row["img_per_s"], 1),
                     "step_s": round(args.c_batch / row["img_per_s"], 3), "data_wait_%": round(100 * row["data_wait"], 2)})
    print(table(rows, ["config", "steps", "batch", "step_s", "img_per_s", "data_wait_%"]))
    print(f"data wait with batches made ahead: {rows[1]['data_wait_%']} % of step time (target <= 5 %)")
    return {"model": "pit-t", "img_size": 32, "data": "CIFAR-10 train JPEGs (mapped decode cache)",
            "augmentation": "crop_padding 4, hflip", "precision": "auto", "rows": rows,
            "ok": rows[1]["data_wait_%"] <= 5.0}


# ---- (d) peak memory of a rank during an FSDP2 checkpoint --------------------------------------------
def checkpoint_worker(args) -> None:
    """One torchrun rank: FSDP2 ViT-B/8 after one AdamW step; the peak RSS one checkpoint adds."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from pixformer.engine.optim import adamw, param_groups
    from pixformer.engine.runtime import Runtime
    from pixformer.models.registry import create_model

    def kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0
    rt = Runtime.create("cpu", fsdp=True)
    with rt.building():                                   # as train builds it: whole on rank 0 alone
        model = create_model("vit-b/8", img_size=32, num_classes=10)
    model = rt.wrap(model)
    opt = adamw(param_groups(model, 0.05), lr=1e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")         # the peak (VmHWM) starts again from here
    before = kib("VmRSS")
    t0 = time.perf_counter()
    if args.way == "every rank":                          # the previous Runtime.full_state
        full = lambda v: v.full_tensor() if isinstance(v, DTensor) else v   # noqa: E731
        weights = {k: full(v) for k, v in model.state_dict().items()}
        st = opt.state_dict()
        moments = {i: {k: full(v) for k, v in s.items()} for i, s in st["state"].items()}
        held = sum(v.numel() * v.element_size() for v in weights.values()) + sum(
            v.numel() * v.element_size() for s in moments.values() for v in s.values())
    else:
        got = rt.checkpoint_state(model, opt)
        held = 0 if got is None else sum(v.numel() * v.element_size() for v in got[0].values()) + sum(
            v.numel() * v.element_size() for s in got[1]["state"].values() for v in s.values())
    seconds = time.perf_counter() - t0
    dist.barrier()
    Path(args.out_dir, f"rank{rt.rank}.json").write_text(json.dumps({   # a file each: ranks' prints interleave
        "rank": rt.rank, "way": args.way, "seconds": seconds, "rss_before": before,
        "peak_added": kib("VmHWM") - before, "full_state_held": held,
        "params": sum(p.numel() for p in model.parameters())}))


def part_d(args, work: Path) -> dict:
    """FSDP2 ViT-B/8, 2 ranks: peak memory a checkpoint adds per rank, every rank gathering vs rank 0 alone."""
    rows = []
    for way, label in (("every rank", "every rank gathers the full state (before)"),
                       ("rank 0", "rank 0 gathers, on its CPU (now)")):
        out = work / f"ckpt-{way.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               __file__, "--checkpoint-worker", "--way", way, "--out-dir", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            sys.exit(f"torchrun failed:\n{done.stderr[-3000:]}")
        for r in (json.loads((out / f"rank{k}.json").read_text()) for k in range(2)):
            rows.append({"checkpoint": label, "rank": r["rank"], "peak_added_MiB": round(r["peak_added"] / 2**20),
                         "full_state_held_MiB": round(r["full_state_held"] / 2**20), "seconds": round(r["seconds"], 2)})
            params = r["params"]
    print(table(rows, ["checkpoint", "rank", "peak_added_MiB", "full_state_held_MiB", "seconds"]))
    one = {r["checkpoint"]: r["peak_added_MiB"] for r in rows if r["rank"] == 1}
    print(f"rank 1's peak during a checkpoint: {' -> '.join(f'{v} MiB' for v in one.values())}")
    return {"model": "vit-b/8", "img_size": 32, "params": params, "ranks": 2, "rows": rows}


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
    ap.add_argument("--images", type=int, default=24_000, help="synthetic JPEGs (a), and the large set (b)")
    ap.add_argument("--size", type=int, default=128, help="(b) decoded side: images x 3 x size^2 bytes mapped")
    ap.add_argument("--tiny", type=int, default=240, help="(b) images in the tiny set")
    ap.add_argument("--batches", type=int, default=40, help="(b) batches of 256 rows gathered per rank")
    ap.add_argument("--small", action="store_true", help="a quick correctness run at tiny sizes")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, removed after)")
    ap.add_argument("--out", default=None, help="results file (default: results/data_scale.json)")
    ap.add_argument("--c-images", type=int, default=1024, help="(c) training images (steps = images / batch)")
    ap.add_argument("--c-batch", type=int, default=64, help="(c) batch size")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--way", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--via", default="batches", help=argparse.SUPPRESS)
    ap.add_argument("--steps-of", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        return rank_worker(args)
    if args.checkpoint_worker:
        return checkpoint_worker(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}: choose from {list(PARTS)}")
    if args.small:
        args.images, args.size, args.tiny, args.batches, args.c_images, args.c_batch = 2_000, 64, 100, 5, 64, 16
    out = Path(args.out) if args.out else RESULTS / ("data_scale-small.json" if args.small else "data_scale.json")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pixformer-data-scale-"))
    machine = {"cpu": perf.cpu_name(), "cores": cores(), "python": platform.python_version()}
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores usable; scratch {work}")
    results = json.loads(out.read_text()) if out.exists() else {}
    try:
        for p in parts:
            print(f"\n== part {p}: {PARTS[p].__doc__}")
            results[p] = {**PARTS[p](args, work), "machine": machine,
                          "command": " ".join([Path(sys.executable).name, *sys.argv])}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))         # after each part: a later failure loses none
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
