"""What the step benchmarks share: time a training step in this process, run each configuration
in a fresh process (so peak memory is its own), comparing against a reference configuration, and
measure this machine's matmul peak, the denominator of every benchmark's share of peak."""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def vit_pytorch_file(name: str):
    """A module of vit-pytorch loaded by file path (`vit.py`, `na_vit.py`): its package `__init__` imports
    torchvision, which does not work with the CPU torch here."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None:
        sys.exit("vit-pytorch is not installed: .venv/bin/pip install --no-deps vit-pytorch")
    path = Path(spec.submodule_search_locations[0]) / name
    mod_spec = importlib.util.spec_from_file_location(f"vit_pytorch_{path.stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds `fn()` takes; `sync` (e.g. torch.cuda.synchronize) waits for queued device work at both ends."""
    if sync:
        sync()
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def device_timing(dev):
    """(sync, reset, peak GiB, what the peak is) for timing a step and its peak memory on torch device `dev`:
    CUDA's allocator figures, or on CPU the process's peak RSS (which cannot be reset)."""
    import torch
    if dev.type == "cuda":
        return (torch.cuda.synchronize, lambda: torch.cuda.reset_peak_memory_stats(dev),
                lambda: torch.cuda.max_memory_allocated(dev) / 2 ** 30, "cuda max_memory_allocated")
    return None, lambda: None, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process peak RSS"


def proc_status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now, VmHWM: its high-water mark; 0 if absent)."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def time_steps(step: Callable[[int], None], steps: int, warmup: int = 2, sync: Callable[[], None] | None = None) -> dict:
    """Median seconds of `step(i)` over `steps` calls after `warmup` untimed ones (their seconds in
    warmup_s), and the process's peak resident memory (GiB) before and after them. `sync`: as for `timed`."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, warm = [], []
    for i in range(steps + warmup):
        (times if i >= warmup else warm).append(timed(lambda: step(i), sync))
    return {"step_s": statistics.median(times), "step_times": times, "warmup_s": warm,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "rss_before_steps_gib": rss0 / 2 ** 20}


def profile_step(step: Callable[[int], None], warmup: int = 2, top: int = 20) -> str:
    """What one `step(i)` spent its time on, after `warmup` untimed calls: torch.profiler's table of the
    `top` ops by self CPU time (each op's own time, its callees' left out), which names the attention
    kernel that ran (`_scaled_dot_product_flash_attention_for_cpu`, `pixformer::blocked_attention`, bmm)."""
    import torch
    for i in range(warmup):
        step(i)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(warmup)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)


def train_step(loss_of: Callable[[int], "torch.Tensor"], opt, amp, device: str = "cpu",
               clip: float = 0.0) -> Callable[[int], None]:
    """One training step for `time_steps`, in the order of train's: the last step's gradients released,
    the loss of step i under autocast `amp` (None: fp32) on `device`'s type, backward, gradient clipping
    to norm `clip` (0: none; `pixformer train` clips at 1.0) and the optimizer step."""
    import torch

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)                 # as train's step: the last gradients go before the forward
        with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_of(i)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
    return step


def dtype_key(dtype) -> str:
    """"fp32" or "bf16" for a torch dtype or its name (torch.bfloat16, "bfloat16", "bf16", ...)."""
    name = str(dtype).replace("torch.", "")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def matmul_peaks(device: str = "cpu", sizes: tuple[int, ...] | None = None, reps: int = 10) -> dict[str, dict[str, float]]:
    """{dtype: {library: FLOP/s}}: the best n x n x n matmul of each GEMM library torch ships, `reps`
    tries of each size, with this process's threads. The peak of a dtype is its best library's (`peak_per_dtype`).
    CPU: fp32 and bf16 through torch.mm (MKL in fp32, oneDNN in bf16) and oneDNN directly (on AMD CPUs
    MKL's fp32 GEMM runs AVX2 code at half of oneDNN's AVX-512 rate), n = 1024, 2048 (bf16 without
    native support: torch.mm only, 512, 3 tries: emulated and slow). CUDA: bf16 through torch.mm (cuBLAS), n = 4096, 8192."""
    import torch

    from pixformer.engine.perf import native_bf16
    mm = lambda a, b: a @ b                                                           # noqa: E731
    if device.startswith("cuda"):
        sync = torch.cuda.synchronize
        plan = [(torch.bfloat16, sizes or (4096, 8192), reps, {"torch.mm": mm})]
    else:
        sync, native = None, native_bf16("cpu")
        onednn = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")   # noqa: E731
        libs_cpu = {"torch.mm": mm, "oneDNN": onednn}
        plan = [(torch.float32, sizes or (1024, 2048), reps, libs_cpu),        # oneDNN has no bf16 GEMM without
                (torch.bfloat16, sizes or ((1024, 2048) if native else (512,)),  # AVX512 (it refuses the primitive)
                 reps if native else min(reps, 3), libs_cpu if native else {"torch.mm": mm})]
    out = {}
    for dtype, ns, tries, libs in plan:
        rates = {}
        for lib, gemm in libs.items():
            for n in ns:
                a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
                gemm(a, b)
                best = min(timed(lambda: gemm(a, b), sync) for _ in range(tries))
                rates[lib] = max(rates.get(lib, 0.0), 2 * n ** 3 / best)
        out[dtype_key(dtype)] = rates
    return out


def peak_per_dtype(by_library: dict[str, dict[str, float]]) -> dict[str, float]:
    """{dtype: FLOP/s} of the best library, from `matmul_peaks`."""
    return {dt: max(rates.values()) for dt, rates in by_library.items()}


def say_peaks(by_library: dict[str, dict[str, float]]) -> str:
    """One line: each dtype's peak and what each library reached."""
    return "matmul peak (best n x n GEMM): " + "; ".join(
        f"{dt} {max(rates.values()) / 1e9:.0f} GFLOP/s (" + ", ".join(f"{lib} {r / 1e9:.0f}" for lib, r in rates.items())
        + ")" for dt, rates in by_library.items())


def run_configs(script: str, configs: list[str], worker_args: list[str], out: str, meta: dict, reference: str,
                merge: bool = False, peak: dict[str, float] | None = None, peers: tuple[str, ...] = ()) -> list[dict]:
    """Run `script --worker NAME *worker_args` per configuration, each in its own process (its last
    stdout line: one JSON row with at least images_s, peak_rss_gib and precision, and flop_s where the
    benchmark counts FLOPs), print the figures (with `peak`, {dtype: FLOP/s} from `peak_per_dtype`, the share of
    the peak in the dtype the row ran) and the ratios against `reference` (the configurations named in `peers`
    also against the one of the reference library that ran in the same precision as published:
    `reference` or `reference`-bf16), and write {**meta, rows} to `out`. Each row records the CPU, torch's threads, the 1-minute
    load average when it started and the command that ran it (with `merge`, rows of other runs stay)."""
    import torch

    from pixformer.engine.perf import cpu_name
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "command": " ".join(["python", *sys.argv])}
    old = json.loads(Path(out).read_text())["rows"] if merge and Path(out).exists() else []
    rows = [r for r in old if r["config"] not in configs]
    for name in configs:
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, script, "--worker", name, *worker_args], capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
            continue
        rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), **machine, "load_before": round(load, 2)})
        r = rows[-1]
        share = ""
        if peak and r.get("flop_s") is not None and dtype_key(r["precision"]) in peak:
            r["share_of_peak"] = r["flop_s"] / peak[dtype_key(r["precision"])]
            share = f"  {r['flop_s'] / 1e9:8.1f} GFLOP/s = {r['share_of_peak']:5.1%} of the {dtype_key(r['precision'])} peak"
        print(f"{name:<22} {r['precision']:<9} {r['images_s']:8.2f} img/s  peak RSS {r['peak_rss_gib']:.2f} GiB{share}"
              f"  (load {load:.2f})", flush=True)
    ref = next((r for r in rows if r["config"] == reference), None)
    if ref:
        for r in rows:
            r[f"speed_vs_{reference}"] = r["images_s"] / ref["images_s"]
            r[f"memory_vs_{reference}"] = r["peak_rss_gib"] / ref["peak_rss_gib"]
            print(f"{r['config']:<22} {r[f'speed_vs_{reference}']:.2f}x the images/s, "
                  f"{r[f'memory_vs_{reference}']:.2f}x the peak memory of {reference}")
    same = {r["precision"]: r for r in rows if r["config"] in (reference, f"{reference}-bf16")}   # as published
    for r in rows:
        peer = same.get(r["precision"])
        if peer and r["config"] in peers:
            r["peer"] = peer["config"]
            r["speed_vs_peer"] = r["images_s"] / peer["images_s"]
            r["memory_vs_peer"] = r["peak_rss_gib"] / peer["peak_rss_gib"]
            print(f"{r['config']:<22} {r['speed_vs_peer']:.2f}x the images/s, {r['memory_vs_peer']:.2f}x the peak memory "
                  f"of {peer['config']} (both {r['precision']})")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**meta, **({"matmul_peak_flop_s": peak} if peak else {}), "rows": rows}, indent=1))
    return rows
