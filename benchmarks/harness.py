"""What the step benchmarks share: time a training step in this process, and run each configuration
in a fresh process (so peak memory is its own), comparing against a reference configuration."""
from __future__ import annotations

import importlib.util
import json
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


def time_steps(step: Callable[[int], None], steps: int, warmup: int = 2) -> dict:
    """Median seconds of `step(i)` over `steps` calls after `warmup` untimed ones, and the process's
    peak resident memory (GiB) before and after them."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "step_times": times,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "rss_before_steps_gib": rss0 / 2 ** 20}


def train_step(loss_of: Callable[[int], "torch.Tensor"], opt, amp) -> Callable[[int], None]:
    """One training step for `time_steps`: the loss of step i under autocast `amp` (None: fp32),
    backward, and the optimizer step."""
    import torch

    def step(i: int) -> None:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_of(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def run_configs(script: str, configs: list[str], worker_args: list[str], out: str, meta: dict, reference: str,
                merge: bool = False) -> list[dict]:
    """Run `script --worker NAME *worker_args` per configuration, each in its own process (its last
    stdout line: one JSON row with at least images_s and peak_rss_gib), print the figures and the
    ratios against `reference`, and write {**meta, rows} to `out`."""
    old = json.loads(Path(out).read_text())["rows"] if merge and Path(out).exists() else []
    rows = [r for r in old if r["config"] not in configs]
    for name in configs:
        done = subprocess.run([sys.executable, script, "--worker", name, *worker_args], capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name:<22} {r['precision']:<9} {r['images_s']:8.2f} img/s  peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    ref = next((r for r in rows if r["config"] == reference), None)
    if ref:
        for r in rows:
            r[f"speed_vs_{reference}"] = r["images_s"] / ref["images_s"]
            r[f"memory_vs_{reference}"] = r["peak_rss_gib"] / ref["peak_rss_gib"]
            print(f"{r['config']:<22} {r[f'speed_vs_{reference}']:.2f}x the images/s, "
                  f"{r[f'memory_vs_{reference}']:.2f}x the peak memory of {reference}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return rows
