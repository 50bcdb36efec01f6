"""AdamW's optimizer step three ways, on a named model's parameters with the same gradients: torch's
CPU default (one tensor at a time), `foreach=True` (lists of whole intermediates) and `fused=True`
(one kernel a tensor, what `pixformer train` uses: engine/optim.py's `adamw`).

    .venv/bin/python benchmarks/adamw_step.py --model dit-s/2 --rounds 20

Time: the three optimizers are built in one process and stepped in turn, round after round, each on
its own copy of the parameters, so that a drift in the machine's speed falls on all alike; the median
step of each is printed, with the largest difference between their parameters after all rounds.
Memory: each variant then runs alone in a fresh process, and the growth of its resident-set high-water
mark over the parameters and gradients is printed: AdamW's two moments plus whatever the step
allocates on the way. Random gradients: the step's cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from harness import proc_status

VARIANTS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parameters(name: str, img_size: int) -> list[torch.Tensor]:
    """The trainable parameters of model `name`, as plain fp32 leaves."""
    from pixformer import create_model
    model = create_model(name, img_size=img_size, num_classes=10)
    return [p.detach().clone().requires_grad_() for p in model.parameters() if p.requires_grad]


def memory(a: argparse.Namespace, variant: str) -> dict:
    """Run alone (a fresh process): the step's high-water growth over parameters and gradients."""
    params = parameters(a.model, a.img_size)
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    open("/proc/self/clear_refs", "w").write("5")              # reset the RSS high-water mark
    before = proc_status("VmRSS")
    opt = torch.optim.AdamW(params, lr=1e-4, **VARIANTS[variant])
    for _ in range(3):
        opt.step()
    grown = proc_status("VmHWM") - before
    state = sum(p.numel() * 4 * 2 for p in params)             # exp_avg and exp_avg_sq, fp32
    return {"variant": variant, "rss_growth_mib": grown / 2**20, "moments_mib": state / 2**20}


def main() -> None:
    from pixformer.engine.perf import cpu_name
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dit-s/2", help="a model name from `pixformer models`")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=20, help="timed steps of each variant (interleaved)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--memory-of", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_of:                                            # the child process of the memory figure
        print(json.dumps(memory(a, a.memory_of)))
        return
    params = parameters(a.model, a.img_size)
    copies = {v: [w.detach().clone().requires_grad_() for w in params] for v in VARIANTS}
    opts = {v: torch.optim.AdamW(copies[v], lr=1e-4, **kw) for v, kw in VARIANTS.items()}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    g = torch.Generator().manual_seed(0)
    for r in range(a.rounds + 3):                              # 3 warm-up rounds
        grads = [torch.randn(w.shape, generator=g) for w in params]
        for v, opt in opts.items():
            for w, grad in zip(copies[v], grads):
                w.grad = grad
            t = time.perf_counter()
            opt.step()
            if r >= 3:
                times[v].append(time.perf_counter() - t)
    n = sum(w.numel() for w in params)
    print(f"{a.model} at {a.img_size}x{a.img_size}: {n / 1e6:.1f} M parameters in {len(params)} tensors; "
          f"{cpu_name()}, {torch.get_num_threads()} threads, {a.rounds} interleaved rounds")
    rows = []
    for v, ts in times.items():
        child = subprocess.run([sys.executable, __file__, "--model", a.model, "--img-size", str(a.img_size),
                                "--memory-of", v], capture_output=True, text=True, check=True)
        mem = json.loads(child.stdout)
        rows.append({**mem, "step_ms": 1e3 * statistics.median(ts), "steps_ms": [1e3 * t for t in ts]})
        extra = mem["rss_growth_mib"] - mem["moments_mib"]
        print(f"{v:<8} step {rows[-1]['step_ms']:7.2f} ms   high-water growth {mem['rss_growth_mib']:6.0f} MiB "
              f"(the moments {mem['moments_mib']:.0f}, beyond them {extra:.0f})")
    for row in rows:
        row["largest_difference_from_single"] = max((x - y).abs().max().item()
                                                    for x, y in zip(copies["single"], copies[row["variant"]]))
        if row["variant"] != "single":
            print(f"largest parameter difference, {row['variant']} against single, after {a.rounds + 3} steps: "
                  f"{row['largest_difference_from_single']:g}")
    if a.out:
        json.dump({"command": " ".join(sys.argv), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                   "model": a.model, "params": n, "steps": a.rounds + 3, "rows": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
