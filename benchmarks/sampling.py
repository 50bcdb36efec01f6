"""Sampling cost of the diffusion task's samplers at the same model: images/s of DDIM on the Gaussian
process against Euler and Heun on the flow process (rectified flow, JiT's samplers), each with the same
number of steps, the same DiT and the same precision, each configuration in a fresh process.

    .venv/bin/python benchmarks/sampling.py                          # dit-s/2 at 32x32, 50 steps, 16 images
    .venv/bin/python benchmarks/sampling.py --model dit-n/2 --steps 10 --num 4   # a quick correctness run

A sampler's cost is its network evaluations: DDIM and Euler take one a step, Heun two (its last step
one), so Heun-50 is expected near half of Euler-50's images/s; the table says what was measured. The
weights are random (speed does not depend on them); guidance is off (scale 1), so each evaluation is one
forward of the batch. Writes benchmarks/results/sampling.json and names the CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from pixformer.engine import perf

RESULTS = Path(__file__).parent / "results"
CONFIGS = [("gaussian", "ddim"), ("flow", "euler"), ("flow", "heun")]


def one(args) -> dict:
    """One configuration, in this process: the median seconds of sampling `num` images over `repeats`."""
    import statistics

    import torch

    from pixformer.engine.perf import autocast_dtype
    from pixformer.tasks import DataFacts, get_task, task_config
    torch.manual_seed(0)
    facts = DataFacts([str(i) for i in range(10)], 3, (args.size, args.size), [0.5] * 3, [0.25] * 3)
    task = get_task("diffusion")(task_config("diffusion", {"process": args.process, "sampler": args.sampler,
                                                           "sample_steps": args.steps}), facts)
    model = task.build_model(args.model, {}).eval()
    amp = autocast_dtype(args.precision, "cpu")
    labels = torch.arange(args.num) % 10

    def run() -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            task.sample(model, args.num, labels, cfg_scale=1.0, sampler=args.sampler, steps=args.steps, seed=0)
        return time.perf_counter() - t0
    run()                                                                     # warm-up: first-call costs
    times = [run() for _ in range(args.repeats)]
    seconds = statistics.median(times)
    return {"process": args.process, "sampler": args.sampler, "steps": args.steps, "num": args.num,
            "seconds": round(seconds, 3), "images_per_s": round(args.num / seconds, 3),
            "times": [round(t, 3) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit-s/2", help="a DiT name (pixformer models)")
    ap.add_argument("--size", type=int, default=32, help="image side (pixels)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps of every sampler")
    ap.add_argument("--num", type=int, default=16, help="images sampled at once (one batch)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (autocast, as pixformer sample)")
    ap.add_argument("--process", help=argparse.SUPPRESS)
    ap.add_argument("--sampler", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "sampling.json"), help="results file")
    args = ap.parse_args()
    if args.process:                                                          # a configuration's own process
        print(json.dumps(one(args)))
        return
    rows = []
    for process, sampler in CONFIGS:
        cmd = [sys.executable, __file__, "--process", process, "--sampler", sampler, "--model", args.model,
               "--size", str(args.size), "--steps", str(args.steps), "--num", str(args.num),
               "--repeats", str(args.repeats), "--precision", args.precision]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{process}/{sampler} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["images_per_s"]
    print(f"CPU: {perf.cpu_name()}; {args.model} at {args.size}x{args.size}, {args.steps} steps, "
          f"{args.num} images a batch, precision {args.precision}")
    print(f"{'process':10}{'sampler':9}{'seconds':>9}{'images/s':>10}{'vs DDIM':>9}")
    for r in rows:
        r["vs_ddim"] = round(r["images_per_s"] / base, 3)
        print(f"{r['process']:10}{r['sampler']:9}{r['seconds']:>9.2f}{r['images_per_s']:>10.2f}{r['vs_ddim']:>8.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": perf.cpu_name(), "model": args.model, "size": args.size, "steps": args.steps,
                               "num": args.num, "precision": args.precision, "rows": rows,
                               "command": " ".join(["python", *sys.argv])}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
