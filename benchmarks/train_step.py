"""One training step (forward, backward, AdamW step) of pixformer's PiT-T against lucidrains'
vit-pytorch ViT at identical dimensions (depth 12, width 192, 3 heads of 64, MLP 768, patch size 1,
class token, 10 classes), at 8x8, 16x16, 32x32 and 64x64 pixels, in one run, side by side.

    .venv/bin/pip install --no-deps vit-pytorch      # the reference; not a pixformer dependency
    .venv/bin/python benchmarks/train_step.py        # ~30 min on 2 cores; --sizes 8 16 for a quick look

Reported per configuration: images/s, tokens/s, step time, achieved FLOP/s (the model's matmul
FLOPs, 3x forward, over the step time; the same count for both models) and its fraction of this
machine's matmul peak in the dtype the step ran in (fp32, or bf16 under autocast), measured in the
same run as the best n x n GEMM of either library torch ships (MKL through torch.mm, oneDNN: on AMD
CPUs MKL's fp32 GEMM runs AVX2 code at half of oneDNN's AVX-512 rate), and peak memory two ways:
  peak RSS   the process's resident-memory high-water mark during the timed steps (VmHWM, reset
             through /proc/self/clear_refs) minus its RSS before the model was built: what the
             machine must have, allocator caching and fragmentation included.
  live peak  the largest total of live tensor bytes during one step, from the allocation events of
             torch's profiler (profile_memory=True), plus the weights, grads and AdamW state held at
             the start of the step: what pixformer.engine.plan estimates, independent of the allocator.
Each configuration runs in a fresh subprocess whose address space is capped (--mem-limit); one that
runs out is reported as "out of memory" with what it asked for. Before the run the script waits for
a quiet CPU (1-minute load average below --max-load) and it reports, per configuration, the share
of the CPUs that other processes used while it was timing (from /proc/stat).

The vit-pytorch package __init__ imports torchvision (broken here), so its vit.py is loaded by path.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import matmul_peaks, peak_per_dtype, proc_status, say_peaks, timed, vit_pytorch_file

DIMS = dict(depth=12, dim=192, heads=3, mlp_dim=768, num_classes=10)   # PiT-T
GiB = 2 ** 30


# ---- the two models ------------------------------------------------------------------------
def reference_vit(img: int):
    return vit_pytorch_file("vit.py").ViT(image_size=img, patch_size=1, num_classes=DIMS["num_classes"], dim=DIMS["dim"],
                   depth=DIMS["depth"], heads=DIMS["heads"], mlp_dim=DIMS["mlp_dim"],
                   dim_head=DIMS["dim"] // DIMS["heads"], pool="cls")


def configs() -> dict[str, dict]:
    """name -> settings. "pixformer" is what `pixformer train` runs by default (TrainConfig's precision
    and speed settings); the others change only what their name says."""
    from dataclasses import asdict

    from pixformer import TrainConfig
    d = TrainConfig()
    default = dict(impl="pixformer", precision=d.precision, **asdict(d.speed))
    return {
        "pixformer": default,
        "pixformer-fp32-plain": {**default, "precision": "fp32", "selective_checkpoint": False},
        "pixformer-ckpt-all": {**default, "checkpoint_blocks": "all"},
        "pixformer-ckpt-release": {**default, "checkpoint_blocks": "all", "allocator": "release"},
        "pixformer-selective": {**default, "selective_checkpoint": True},       # the defaults' two choices,
        "pixformer-no-selective": {**default, "selective_checkpoint": False},  # each forced on and off
        "pixformer-system-malloc": {**default, "allocator": "system"},
        "pixformer-no-lean": {**default, "lean_mlp": False},                   # the MLP keeps both activations
        "pixformer-lean-norms": {**default, "lean_norms": True},               # the norms' outputs recomputed
        "pixformer-fp32-no-lean": {**default, "precision": "fp32", "selective_checkpoint": False, "lean_mlp": False},
        "pixformer-fp32-system-malloc": {**default, "precision": "fp32", "selective_checkpoint": False,
                                         "allocator": "system"},
        "vit-pytorch": dict(impl="vit-pytorch", precision="fp32"),
        "pixformer-bf16": {**default, "precision": "bf16"},
        "vit-pytorch-bf16": dict(impl="vit-pytorch", precision="bf16"),
    }


# ---- measurements --------------------------------------------------------------------------
def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def live_peak_bytes(fn) -> int:
    """Largest increase of live tensor bytes while `fn` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def worker(job: dict) -> dict:
    """Build one configuration, run warm-up, timed and profiled steps; everything in this process."""
    from pixformer import create_model
    from pixformer.engine.optim import adamw
    from pixformer.engine.perf import apply_speed_settings, autocast_dtype, checkpointed_blocks
    from pixformer.engine.plan import plan, selective_pays

    cfg, img, batch, steps = job["config"], job["img"], job["batch"], job["steps"]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img)
    y = torch.randint(0, DIMS["num_classes"], (batch,))
    rss0 = proc_status("VmRSS")
    ours = create_model("pit-t", img_size=img, num_classes=DIMS["num_classes"])
    flops = ours.flops()                                      # identical dimensions: one count for both
    amp = autocast_dtype(cfg["precision"], "cpu")
    est = None
    if cfg["impl"] == "pixformer":
        speed = {k: v for k, v in cfg.items() if k not in ("impl", "precision")}
        if speed["selective_checkpoint"] is None:                       # as train decides it
            speed["selective_checkpoint"] = selective_pays("pit-t", img, batch, "bf16" if amp else "fp32",
                                                           cfg["attn_backend"], lean_mlp=speed["lean_mlp"],
                                                           lean_norms=speed["lean_norms"])
        model = apply_speed_settings(ours, **speed)
        ckpt = checkpointed_blocks(model)
        mode = "full" if ckpt["full"] else ("selective" if ckpt["selective"] else "none")
        est = plan("pit-t", img, batch, precision="bf16" if amp else "fp32", attn_backend=cfg["attn_backend"],
                   lean_mlp=speed["lean_mlp"], lean_norms=speed["lean_norms"]).peak_bytes(batch, mode)
    else:
        del ours
        model = reference_vit(img)
    model.train()
    opt = adamw(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)                       # as train's step: before the forward
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()

    result = {"params": sum(p.numel() for p in model.parameters()), "dtype": "bf16" if amp else "fp32"}
    try:
        step()                                                # warm-up: AdamW state, allocator, caches
        if cfg.get("compile"):
            step()
        open("/proc/self/clear_refs", "w").write("5")         # reset the RSS high-water mark
        busy0, total0, own0 = *cpu_jiffies(), sum(os.times()[:2])
        times = [timed(step) for _ in range(steps)]
        busy1, total1, own1 = *cpu_jiffies(), sum(os.times()[:2])
        rss_peak = proc_status("VmHWM") - rss0
        held = sum(t.nbytes for t in model.parameters()) * 2 + x.nbytes + y.nbytes + sum(
            v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        live = held + live_peak_bytes(step) if job["live"] else None
    except (RuntimeError, MemoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, MemoryError) or "alloc" in msg.lower() or "memory" in msg.lower():
            return {**result, "status": "out of memory", "error": msg[:200]}
        raise
    hz = os.sysconf("SC_CLK_TCK")
    others = max(0.0, ((busy1 - busy0) - (own1 - own0) * hz) / max(total1 - total0, 1))
    step_s = sorted(times)[len(times) // 2]
    return {**result, "status": "ok", "step_s": step_s, "step_times": times,
            "images_s": batch / step_s, "tokens_s": batch * img * img / step_s,
            "flops_per_step": 3 * flops * batch, "flop_s": 3 * flops * batch / step_s,
            "rss_peak": rss_peak, "live_peak": live, "plan_estimate": est, "others_cpu": others}


def run_job(job: dict, mem_limit: int) -> dict:
    """Run `worker(job)` in a fresh subprocess with its address space capped at `mem_limit`."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          preexec_fn=cap)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    if proc.returncode < 0 or "memory" in err.lower() or "alloc" in err.lower():
        return {"status": "out of memory", "error": err[:200]}
    return {"status": "failed", "error": err[:200]}


# ---- the run -------------------------------------------------------------------------------
def wait_for_quiet(max_load: float, timeout: float) -> tuple[float, float]:
    """Wait until the 1-minute load average is below `max_load` (at most `timeout` s); (load, waited s)."""
    t0 = time.time()
    while True:
        load = float(open("/proc/loadavg").read().split()[0])
        if load < max_load or time.time() - t0 > timeout:
            return load, time.time() - t0
        print(f"  waiting for a quiet CPU: load {load:.2f} >= {max_load}", flush=True)
        time.sleep(20)


def machine() -> dict:
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) * 1024
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "isa": isa,
            "memory_gib": round(mem / GiB, 1), "torch": torch.__version__, "python": platform.python_version()}


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def table(rows: list[dict], peaks: dict) -> str:
    head = (f"{'input':>6} {'tokens':>6} {'batch':>5}  {'configuration':<22} {'dtype':<5} {'img/s':>7} {'tokens/s':>9} "
            f"{'step s':>7} {'GFLOP/s':>8} {'of peak':>7} {'peak RSS':>9} {'live peak':>9} {'planned':>8} "
            f"{'others':>6}")
    out = [head, "-" * len(head)]
    for r in rows:
        size = f"{r['img']}x{r['img']}"
        if r["status"] != "ok":
            out.append(f"{size:>6} {r['img'] ** 2:>6} {r['batch']:>5}  {r['config']:<22} {r['status'].upper()}: "
                       f"{r.get('error', '')[:90]}")
            continue
        peak = peaks[r["dtype"]]
        g = lambda b: fmt(b and b / GiB, ".2f")                               # noqa: E731
        out.append(f"{size:>6} {r['img'] ** 2:>6} {r['batch']:>5}  {r['config']:<22} {r['dtype']:<5} {r['images_s']:>7.1f} "
                   f"{r['tokens_s']:>9,.0f} {r['step_s']:>7.2f} {r['flop_s'] / 1e9:>8.1f} "
                   f"{r['flop_s'] / peak:>7.0%} {g(r['rss_peak']):>9} {g(r['live_peak']):>9} "
                   f"{g(r['plan_estimate']):>8} {r['others_cpu']:>6.0%}")
    return "\n".join(out)


def ratios(rows: list[dict]) -> list[str]:
    by = {(r["img"], r["config"]): r for r in rows}
    lines = []
    for img in sorted({r["img"] for r in rows}):
        for ref_name, pairs in (("vit-pytorch", (("pixformer", "default"), ("pixformer-fp32-plain", "fp32 plain"),
                                                 ("pixformer-ckpt-all", "ckpt all"),
                                                 ("pixformer-ckpt-release", "ckpt all + release"))),
                                ("vit-pytorch-bf16", (("pixformer", "default"), ("pixformer-bf16", "bf16")))):
            ref, parts = by.get((img, ref_name)), []
            for name, label in pairs:
                r = by.get((img, name))
                if not ref or not r or r["status"] != "ok" or (ref_name.endswith("bf16") and r["dtype"] != "bf16"):
                    continue
                if ref["status"] == "ok":
                    parts.append(f"{label}: {r['images_s'] / ref['images_s']:.2f}x speed, "
                                 f"{r['rss_peak'] / ref['rss_peak']:.2f}x RSS"
                                 + (f", {r['live_peak'] / ref['live_peak']:.2f}x live" if r["live_peak"] and
                                    ref["live_peak"] else ""))
                else:
                    parts.append(f"{label}: runs ({r['rss_peak'] / GiB:.2f} GiB RSS); {ref_name} {ref['status']}")
            if parts:
                lines.append(f"{img}x{img}  pixformer / {ref_name}  " + "; ".join(parts))
    return lines


def plot(rows: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in configs() if any(r["config"] == n for r in rows)]
    for i, name in enumerate(names):
        rs = [r for r in rows if r["config"] == name]
        ok = [r for r in rs if r["status"] == "ok"]
        style = dict(marker="o", color=f"C{i}", label=name, ls="--" if "vit-pytorch" in name else "-")
        a.plot([r["img"] ** 2 for r in ok], [r["images_s"] for r in ok], **style)
        b.plot([r["img"] ** 2 for r in ok], [r["rss_peak"] / GiB for r in ok], **style)
        for r in rs:
            if r["status"] != "ok":
                b.scatter([r["img"] ** 2], [b.get_ylim()[1] if ok else 1], marker="x", s=80, color=f"C{i}")
                b.annotate("out of memory", (r["img"] ** 2, b.get_ylim()[1]), fontsize=8, color=f"C{i}",
                           ha="right", va="top")
    for ax, label in ((a, "images / s (training step)"), (b, "peak RSS of the step (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (pixels) per image")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="per size (default 32, and 8 at 64x64)")
    ap.add_argument("--configs", nargs="+", default=["pixformer", "pixformer-fp32-plain", "pixformer-ckpt-all",
                                                     "pixformer-ckpt-release", "vit-pytorch"])
    ap.add_argument("--bf16-sizes", type=int, nargs="*", default=None,
                    help="sizes also run under bf16 autocast (default: all where the CPU has native bf16, else 8)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    ap.add_argument("--mem-limit", default="16GiB", help="address-space cap per configuration")
    ap.add_argument("--max-load", type=float, default=0.7)
    ap.add_argument("--wait", type=float, default=1800, help="at most this long for a quiet CPU, seconds")
    ap.add_argument("--no-live", action="store_true", help="skip the profiled step (live-tensor peak)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, one per core); 1 gives steadier figures on a shared machine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from pixformer.engine.plan import parse_bytes
    if importlib.util.find_spec("vit_pytorch") is None:
        sys.exit("vit-pytorch is not installed: .venv/bin/pip install --no-deps vit-pytorch")
    batches = args.batch or [8 if s >= 64 else 32 for s in args.sizes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    load0, waited = wait_for_quiet(args.max_load, args.wait)
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), "
          f"{'/'.join(info['isa'])}, {info['memory_gib']} GiB; torch {info['torch']}")
    print(f"load average at start: {load0:.2f} (waited {waited:.0f} s)", flush=True)
    from pixformer.engine.perf import autocast_dtype, native_bf16
    by_lib = matmul_peaks("cpu")
    peaks = peak_per_dtype(by_lib)
    print(f"{say_peaks(by_lib)}, {info['threads']} threads", flush=True)

    all_cfgs, rows = configs(), []
    jobs = [(img, b, name) for img, b in zip(args.sizes, batches) for name in args.configs]
    bf16_sizes = args.bf16_sizes if args.bf16_sizes is not None else (args.sizes if native_bf16("cpu") else [8])
    bf16_names = ["vit-pytorch-bf16"] + ([] if autocast_dtype(all_cfgs["pixformer"]["precision"], "cpu") else
                                         ["pixformer-bf16"])   # the default already runs bf16 where native
    jobs += [(img, b, name) for img, b in zip(args.sizes, batches) if img in bf16_sizes for name in bf16_names]
    for img, batch, name in jobs:
        job = {"config": all_cfgs[name], "img": img, "batch": batch, "steps": args.steps, "live": not args.no_live,
               "threads": args.threads}
        load = float(open("/proc/loadavg").read().split()[0])
        t0 = time.time()
        r = {"config": name, "img": img, "batch": batch, "load_before": load,
             **run_job(job, parse_bytes(args.mem_limit))}
        rows.append(r)
        status = f"{r['images_s']:.1f} img/s, {r['rss_peak'] / GiB:.2f} GiB RSS, others {r['others_cpu']:.0%}" \
            if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        print(f"  {img}x{img} batch {batch} {name}: {status} ({time.time() - t0:.0f} s)", flush=True)
    load1 = float(open("/proc/loadavg").read().split()[0])

    print()
    print(table(rows, peaks))
    print()
    print("\n".join(ratios(rows)))
    print(f"\nload average: {load0:.2f} at start, {load1:.2f} at the end (this run itself keeps it near "
          f"{info['threads']}); 'others' = CPU share used by other processes while timing")
    title = (f"PiT-T (pixformer) vs vit-pytorch ViT, patch 1, training step; {info['cpu']}, {info['cores']} cores, "
             f"torch {info['torch']}")
    cmd = "python benchmarks/train_step.py " + " ".join(sys.argv[1:])
    (out / "train_step.json").write_text(json.dumps(
        {"command": cmd.strip(), "machine": info, "matmul_peak_flop_s": peaks, "matmul_flop_s_by_library": by_lib,
         "dims": DIMS,
         "load_start": load0, "load_end": load1, "configs": {n: all_cfgs[n] for n in {r["config"] for r in rows}},
         "rows": rows}, indent=1))
    plot(rows, out / "train_step.png", title)
    print(f"results: {out / 'train_step.json'}\nplot:    {out / 'train_step.png'}")


if __name__ == "__main__":
    main()
