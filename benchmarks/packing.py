"""Packing (NaViT's Patch n' Pack) against padding: one classification training step (batching,
forward, backward, AdamW) over the same mixed-resolution images, four ways (five with --equal):

    packed        pixformer: images packed greedily into sequences of at most --pack-length tokens, as
                  `pixformer train` packs on CPU (unbucketed: as short as the images allow); attention
                  within each image through segment ids ("auto": the "varlen" kernel on CPU)
    pad           pixformer: every image in a row of its own, padded to the largest in the batch, a key
                  padding mask through SDPA (a padded ViT)
    navit         vit-pytorch's NaViT (lucidrains, `na_vit.py`, loaded by file path: its package imports
                  torchvision), packing its own way (group_images, the same --pack-length), dense masks
    navit-nested  vit-pytorch's `na_vit_nested_tensor.py`: every image a jagged NestedTensor row, SDPA on
                  them (torch has no fused jagged kernel on CPU: its math path over per-image rows)
    batch         with --equal only: pixformer's plain batch (B, C, H, W), no packing, no mask, "auto"
                  attention: what packing costs against not packing at all

Identical dimensions: depth 6, width 128, 4 heads of 32, MLP 512 (pixformer's vit-n), patch --patch,
101 classes, mean pooling for pixformer (NaViT pools by attention), each under the autocast of
--precision (auto: bf16 where the CPU has it natively, pixformer's default). The images: Caltech-101's
shared training photos (--data), each resized to a longer side drawn from [--lo, --hi] (NaViT's
resolution sampling; aspect kept, whole patches), the same draws for every configuration; with
--equal SIDE every image SIDE x SIDE instead (equal lengths: padding has nothing to save, so what
packing itself costs shows). The figure of merit is useful (image, non-padding) tokens per second;
packing efficiency is useful tokens / sequence slots.
Each configuration also prints its useful GFLOP/s and their share of this machine's matmul peak in the
dtype it ran (measured in the same run, harness.matmul_peaks): the FLOPs are what the images themselves
need, 3x the forward matmuls of pixformer's ViT at each image's own grid (VisionTransformer.flops, the
same dimensions for every configuration); padding, attention across a pack and NaViT's attention
pooling are not counted. Then packed's ratio to each other configuration, with its goal (GOALS).

    .venv/bin/python benchmarks/packing.py [--batch 32] [--steps 3] [--equal SIDE] [--configs ...]
    .venv/bin/python benchmarks/packing.py --worker packed --threads 1 --profile 25   # one step's costliest ops
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness import matmul_peaks, peak_per_dtype, run_configs, say_peaks, time_steps, train_step, vit_pytorch_file

DIMS = dict(depth=6, dim=128, heads=4, mlp=512, classes=101)
CONFIGS = ["packed", "pad", "navit", "navit-nested"]
EQUAL_CONFIGS = ["packed", "pad", "batch"]
GOALS = {"pad": None, "navit": 3.0, "navit-nested": 1.0, "batch": 0.9}   # packed's useful tokens/s against each
#                                                                          (--equal: pad 0.9 too)


def top_side(a) -> int:
    """The longest side an image can have: --hi, or the --equal side."""
    return max(a.hi, a.equal)


def batches(a, n_steps: int):
    """`n_steps` batches of uint8 images at sampled resolutions (with --equal: all SIDE x SIDE, squashed),
    the same for every configuration."""
    import torch

    from pixformer.data.augment import resize
    from pixformer.data.native import fit_grid
    from pixformer.data.sources import load_source
    data = load_source(a.data, native=True, max_side=top_side(a))
    data = data.get("train", data.get("all"))
    g = torch.Generator().manual_seed(0)
    out = []
    for s in range(n_steps):
        idx = torch.randperm(len(data), generator=g)[: a.batch].tolist()
        imgs = []
        for i in idx:
            im = data.images[i]
            side = int(torch.randint(a.lo, a.hi + 1, (1,), generator=g))
            gh, gw = fit_grid(im.shape[-2], im.shape[-1], a.patch, a.hi, None, side)
            imgs.append(resize(im[None], (a.equal, a.equal) if a.equal else (gh * a.patch, gw * a.patch))[0])
        out.append((imgs, torch.randint(0, DIMS["classes"], (a.batch,), generator=g)))
    return out


def worker(name: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    from pixformer import Speed, create_model
    from pixformer.data.augment import normalize
    from pixformer.data.native import NativeBatcher
    from pixformer.engine.optim import adamw
    from pixformer.engine.perf import apply_speed_settings, autocast_dtype, set_allocator

    torch.manual_seed(0)
    set_allocator(a.allocator)                     # every configuration's process alike (pixformer's: below too)
    amp = autocast_dtype(a.precision, torch.device("cpu"))
    data = batches(a, a.steps + 2)
    norm = lambda x: normalize(x, [0.5] * 3, [0.25] * 3)              # noqa: E731
    useful = [sum((im.shape[1] // a.patch) * (im.shape[2] // a.patch) for im in imgs) for imgs, _ in data]
    slots = []
    ours = create_model("vit-n/1", img_size=a.hi, patch_size=a.patch, num_classes=DIMS["classes"], pool="mean",
                        mlp_ratio=DIMS["mlp"] / DIMS["dim"])
    flops = sum(3 * ours.flops(tuple(im.shape[1:])) for imgs, _ in data[2:] for im in imgs) / a.steps  # a timed step's
    if name == "navit":
        NaViT = vit_pytorch_file("na_vit.py").NaViT
        model = NaViT(image_size=top_side(a), patch_size=a.patch, num_classes=DIMS["classes"], dim=DIMS["dim"],
                      depth=DIMS["depth"], heads=DIMS["heads"], mlp_dim=DIMS["mlp"], dim_head=DIMS["dim"] // DIMS["heads"])

        def loss_of(i):
            imgs, y = data[i]
            logits = model([norm(im[None])[0] for im in imgs], group_images=True, group_max_seq_len=a.pack_length)
            return F.cross_entropy(logits.float(), y)
    elif name == "navit-nested":
        NaViT = vit_pytorch_file("na_vit_nested_tensor.py").NaViT
        model = NaViT(image_size=top_side(a), patch_size=a.patch, num_classes=DIMS["classes"], dim=DIMS["dim"],
                      depth=DIMS["depth"], heads=DIMS["heads"], mlp_dim=DIMS["mlp"], dim_head=DIMS["dim"] // DIMS["heads"],
                      token_dropout_prob=0.0)

        def loss_of(i):
            imgs, y = data[i]
            return F.cross_entropy(model([norm(im[None])[0] for im in imgs]).float(), y)
    elif name == "batch":
        if not a.equal:
            sys.exit("the batch configuration needs images of one size: --equal SIDE")
        model = apply_speed_settings(ours, Speed(allocator=a.allocator))

        def loss_of(i):
            imgs, y = data[i]
            return F.cross_entropy(model(norm(torch.stack(imgs))).float(), y)
    else:
        model = ours
        apply_speed_settings(model, Speed(attn_backend="auto" if name == "packed" else "sdpa",
                                          allocator=a.allocator))   # what `pixformer train` applies
        batcher = NativeBatcher(a.patch, False, top_side(a), None, a.pack_length if name == "packed" else None,
                                bucket=False)             # as `pixformer train` packs on CPU (batcher_for)

        def loss_of(i):
            imgs, y = data[i]
            packed = batcher(imgs, norm)
            if len(slots) < len(data):
                slots.append(packed.segments.numel())
            return F.cross_entropy(model(packed).float(), y)
    opt = adamw(model.parameters(), lr=1e-4)
    step = train_step(loss_of, opt, amp)
    t = time_steps(step, a.steps)
    if a.profile:
        say_profile(lambda: step(len(data) - 1), a.profile)
    seconds = t["step_s"]
    tokens = sum(useful[2:]) / a.steps
    row = {"config": name, "precision": str(amp or torch.float32)[6:], "images_s": a.batch / seconds,
           "useful_tokens_s": tokens / seconds, "useful_tokens_per_step": tokens, "step_s": seconds,
           "step_times": t["step_times"],
           "flop_s": flops / seconds,
           "peak_rss_gib": t["peak_rss_gib"]}
    if slots:
        row["packing_efficiency"] = sum(useful[: len(slots)]) / sum(slots)
    return row


def say_profile(step, rows: int) -> None:
    """Print (stderr) where one more step's time goes: torch.profiler's `rows` costliest ops by self time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), file=sys.stderr)


def torch_threads(a) -> int:
    """The threads each configuration's process runs with."""
    import torch
    return a.threads or torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None)
    ap.add_argument("--configs", nargs="+", default=None, help=f"default: {' '.join(CONFIGS)} (--equal: "
                    f"{' '.join(EQUAL_CONFIGS)})")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/caltech101.tar.gz"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--lo", type=int, default=32)
    ap.add_argument("--hi", type=int, default=96)
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--allocator", default="auto", help="glibc malloc policy of every configuration's process "
                    "(pixformer.engine.perf.set_allocator; auto: keep, what `pixformer train` sets)")
    ap.add_argument("--profile", type=int, default=0, help="with --worker: print the N costliest ops of one more step")
    ap.add_argument("--equal", type=int, default=0, metavar="SIDE",
                    help="every image SIDE x SIDE (equal lengths: what packing costs where padding has nothing to save)")
    ap.add_argument("--rounds", type=int, default=1, help="run the configurations this many times, interleaved; "
                    "each one's figures: its median round")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/packing.json (--equal S: packing_equalS.json)")
    a = ap.parse_args()
    a.configs = a.configs or (EQUAL_CONFIGS if a.equal else CONFIGS)
    a.out = a.out or f"benchmarks/results/packing{f'_equal{a.equal}' if a.equal else ''}.json"
    if a.equal and a.equal % a.patch:
        sys.exit(f"--equal {a.equal} is not a whole number of {a.patch}-pixel patches")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    if not Path(a.data).exists():
        sys.exit(f"{a.data} not found: the benchmark needs mixed-resolution images (Caltech-101's shared training photos)")
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("worker", "configs", "out")]
    from pixformer.engine.perf import cpu_name
    by_lib = matmul_peaks("cpu")
    print(say_peaks(by_lib), flush=True)
    load = os.getloadavg()                                  # what else the machine was doing (1, 5, 15 min)
    meta = {"machine": cpu_name(), "threads": torch_threads(a), "load_average_before": load,
            "command": " ".join([".venv/bin/python benchmarks/packing.py", *sys.argv[1:]]),
            "settings": {k: v for k, v in vars(a).items() if k not in ("worker", "configs")},
            "matmul_flop_s_by_library": by_lib, "matmul_peak_flop_s": peak_per_dtype(by_lib)}
    rounds = []
    for r in range(a.rounds):                               # configurations interleaved: a slow spell of the
        if a.rounds > 1:                                    # machine falls on every one of them
            print(f"round {r + 1} of {a.rounds}", flush=True)
        rounds += run_configs(__file__, a.configs, passed, a.out, meta, "pad", peak=peak_per_dtype(by_lib))
    rows = [dict(median_row([r for r in rounds if r["config"] == c])) for c in dict.fromkeys(r["config"] for r in rounds)]
    pad = next((r for r in rows if r["config"] == "pad"), None)
    for r in rows if pad else ():                           # against the median pad, not its own round's
        r["speed_vs_pad"], r["memory_vs_pad"] = r["images_s"] / pad["images_s"], r["peak_rss_gib"] / pad["peak_rss_gib"]
    Path(a.out).write_text(json.dumps({**meta, "rows": rows, **({"rounds": rounds} if a.rounds > 1 else {})}, indent=1))
    if a.rounds > 1:
        print(f"the median of {a.rounds} rounds:")
    for r in rows:
        eff = f"  packing efficiency {r['packing_efficiency']:.1%}" if "packing_efficiency" in r else ""
        print(f"{r['config']:<12} {r['useful_tokens_s']:9.0f} useful tokens/s{eff}")
    packed = next((r for r in rows if r["config"] == "packed"), None)
    if packed:
        for other, goal in GOALS.items():
            o = next((r for r in rows if r["config"] == other), None)
            if o:
                goal = 0.9 if a.equal and other == "pad" else goal
                ratio = packed["useful_tokens_s"] / o["useful_tokens_s"]
                print(f"packed: {ratio:.2f}x the useful tokens/s of {other}" + (
                      f" (goal >= {goal:.2f}x: {'met' if ratio >= goal else 'not met'})" if goal else ""))


def median_row(rows: list[dict]) -> dict:
    """The row of median useful tokens/s among one configuration's rounds (the lower middle of an even count)."""
    return sorted(rows, key=lambda r: r["useful_tokens_s"])[(len(rows) - 1) // 2]

if __name__ == "__main__":
    main()
