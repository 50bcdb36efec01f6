"""The data layer at scale: decoding an image folder, and a mapped training set's memory per rank.

    (a) decode     images/s decoding a synthetic folder of JPEGs (written here: --images, 64x64,
                   random but smooth) into the decode cache with 1 worker and with every core, each
                   into a fresh cache (PIXFORMER_CACHE), so each really decodes. Timed: load_source,
                   folder scan and fingerprint included. Target: >= 1.8x with 2 cores.
    (b) memory     a training set of >= 1 GB mapped by torchrun ranks (1 process, then 2): the same
                   synthetic JPEGs decoded at --size x --size (--images x 3 x size^2 bytes), and a tiny
                   set of --tiny images at the same size. Each rank runs load_source + resolve_splits
                   + channel_stats + --batches batches of 256 rows (train.images[idx]) and reports its
                   anonymous memory (RssAnon, /proc/self/status). The large set may add at most 10 % of
                   its size over the tiny one, per rank. Both sets are decoded by this script first,
                   so the ranks measure mapping, not decoding.

One command runs the parts asked (--parts, default all), prints a table each, names the CPU, and
writes benchmarks/results/data_scale.json (parts not run keep their earlier figures there). --small
is a quick correctness run at tiny sizes (figures not meaningful; written to data_scale-small.json).

    .venv/bin/python benchmarks/data_scale.py                 # parts a and b, full size (minutes)
    .venv/bin/python benchmarks/data_scale.py --parts b       # one part
    .venv/bin/python benchmarks/data_scale.py --small         # does it work

The rank side of part (b) is this file again, launched by torchrun with --rank-worker.
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

RESULTS = Path(__file__).parent / "results"


# ---- shared --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    mean, std = channel_stats(splits.train.images)
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", 0)))
    touched = 0.0
    for _ in range(args.batches):
        idx = torch.randint(0, len(splits.train), (256,), generator=g)
        touched += float(splits.train.images[idx].float().mean())
    after = status()
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
                      "images": len(splits.train) + len(splits.val), "dataset_bytes": splits.train.images.nbytes +
                      splits.val.images.nbytes, "before": before, "after": after}), flush=True)


def run_ranks(folder: Path, size: int, nproc: int, batches: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, "--rank-worker", "--data", str(folder), "--size", str(size), "--batches", str(batches)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(f"torchrun failed:\n{done.stderr[-3000:]}")
    return sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])


def part_b(args, work: Path) -> dict:
    """RssAnon per rank after loading a >= 1 GB mapped set against a tiny one, 1 and 2 processes."""
    from pixformer.data.sources import load_source
    os.environ["PIXFORMER_CACHE"] = str(work / "cache-b")
    sets = {"tiny": synthetic_folder(work / "tiny", args.tiny, seed=1),
            "large": synthetic_folder(work / "jpegs", args.images)}
    for name, folder in sets.items():                 # decoded here, once: the ranks map
        load_source(str(folder), img_size=(args.size, args.size))
    rows, checks = [], []
    for nproc in (1, 2):
        got = {name: run_ranks(folder, args.size, nproc, args.batches) for name, folder in sets.items()}
        for tiny, large in zip(got["tiny"], got["large"]):
            growth = large["after"]["RssAnon"] - tiny["after"]["RssAnon"]
            limit = 0.1 * large["dataset_bytes"]
            rows.append({"processes": nproc, "rank": large["rank"],
                         "dataset_MiB": round(large["dataset_bytes"] / 2**20),
                         "RssAnon_tiny_MiB": round(tiny["after"]["RssAnon"] / 2**20, 1),
                         "RssAnon_large_MiB": round(large["after"]["RssAnon"] / 2**20, 1),
                         "growth_MiB": round(growth / 2**20, 1), "limit_MiB": round(limit / 2**20, 1),
                         "RssFile_large_MiB": round(large["after"]["RssFile"] / 2**20, 1),
                         "ok": growth <= limit})
            checks.append(growth <= limit)
    print(table(rows, ["processes", "rank", "dataset_MiB", "RssAnon_tiny_MiB", "RssAnon_large_MiB",
                       "growth_MiB", "limit_MiB", "RssFile_large_MiB", "ok"]))
    print(f"every rank within 10 % of the dataset: {all(checks)}")
    return {"images": args.images, "tiny_images": args.tiny, "size": args.size, "batches": args.batches,
            "source": "synthetic 64x64 JPEG folder decoded at --size (load_source, resize in the decoder)",
            "rows": rows, "ok": all(checks)}


PARTS = {"a": part_a, "b": part_b}        # parts c and d: added by their own functions, one per part


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
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        return rank_worker(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}: choose from {list(PARTS)}")
    if args.small:
        args.images, args.size, args.tiny, args.batches = 2_000, 64, 100, 5
    out = Path(args.out) if args.out else RESULTS / ("data_scale-small.json" if args.small else "data_scale.json")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pixformer-data-scale-"))
    machine = {"cpu": cpu_model(), "cores": cores(), "python": platform.python_version()}
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores usable; scratch {work}")
    results = json.loads(out.read_text()) if out.exists() else {}
    try:
        for p in parts:
            print(f"\n== part {p}: {PARTS[p].__doc__}")
            results[p] = {**PARTS[p](args, work), "machine": machine,
                          "command": " ".join([Path(sys.executable).name, *sys.argv])}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
