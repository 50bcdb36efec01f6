"""Muon's optimizer step: torch's `torch.optim.Muon` (one Newton–Schulz iteration per matrix) against
pixformer's `StackedMuon` (one batched iteration per wide shape), on the weight matrices Muon updates
in a named model, with the same gradients.

    .venv/bin/python benchmarks/muon_step.py --model vit-n/4 --rounds 40

Both optimizers are built in one process and stepped in turn, round after round, each on its own copy
of the matrices, so that a drift in the machine's speed falls on both alike; the median step of each is
printed, with the largest difference from torch's parameters after all rounds (0: bit for bit).
StackedMuon runs in bf16 as torch's does, and on a CPU that emulates bf16 (no AVX512-BF16 or AMX) also
in fp32, its default there.
Random gradients: the step's cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from pixformer import create_model
    from pixformer.engine.optim import StackedMuon, muon_matrices
    from pixformer.engine.perf import cpu_name, native_bf16
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit-n/4", help="a model name from `pixformer models`")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=40, help="timed steps of each optimizer (interleaved)")
    a = p.parse_args()
    model = create_model(a.model, img_size=a.img_size, num_classes=10)
    mats = [w for w in model.parameters() if id(w) in muon_matrices(model)]
    settings = dict(lr=2e-3, adjust_lr_fn="match_rms_adamw")
    opts = {"torch.optim.Muon": lambda ws: torch.optim.Muon(ws, **settings),
            "StackedMuon (bf16)": lambda ws: StackedMuon(ws, ns_dtype=torch.bfloat16, **settings)}
    if not native_bf16("cpu"):                      # its default here: the iteration in fp32
        opts["StackedMuon (fp32)"] = lambda ws: StackedMuon(ws, **settings)
    copies = [[w.detach().clone().requires_grad_() for w in mats] for _ in opts]
    opts = {name: make(ws) for (name, make), ws in zip(opts.items(), copies)}
    times: dict[str, list[float]] = {name: [] for name in opts}
    g = torch.Generator().manual_seed(0)
    for r in range(a.rounds + 3):                                     # 3 warm-up rounds
        grads = [torch.randn(w.shape, generator=g) for w in mats]
        for (name, opt), ws in zip(opts.items(), copies):
            for w, grad in zip(ws, grads):
                w.grad = grad.clone()
            t = time.perf_counter()
            opt.step()
            if r >= 3:
                times[name].append(time.perf_counter() - t)
    shapes = sorted({tuple(w.shape) for w in mats})
    print(f"{a.model}: {len(mats)} matrices of shapes {shapes}; {cpu_name()}, {torch.get_num_threads()} threads, "
          f"{a.rounds} interleaved rounds")
    first = statistics.median(times["torch.optim.Muon"])
    for (name, ts), ws in zip(times.items(), copies):
        med = statistics.median(ts)
        diff = max((x - y).abs().max().item() for x, y in zip(ws, copies[0]))
        print(f"{name:<20} step {1e3 * med:7.2f} ms  ({first / med:5.2f}x torch's speed); largest parameter "
              f"difference from torch's after {a.rounds + 3} steps: {diff:g}")


if __name__ == "__main__":
    main()
