"""Muon's optimizer step: torch's `torch.optim.Muon` (one Newton–Schulz iteration per matrix) against
pixformer's `StackedMuon` (one batched iteration per wide shape), on the weight matrices Muon updates
in a named model, with the same gradients.

    .venv/bin/python benchmarks/muon_step.py --model vit-n/4 --rounds 40
    .venv/bin/python benchmarks/muon_step.py --model vit-s/4 --ranks 2 --rounds 6   # under FSDP and DDP, over 2 processes

Both optimizers are built in one process and stepped in turn, round after round, each on its own copy
of the matrices, so that a drift in the machine's speed falls on both alike; the median step of each is
printed, with the largest difference from torch's parameters after all rounds (0: bit for bit).
StackedMuon runs in bf16 as torch's does, and on a CPU that emulates bf16 (no AVX512-BF16 or AMX) also
in fp32, its default there.
Random gradients (under --ranks: one backward pass of random images): the step's cost does not depend
on their values.

With --ranks N the script launches itself over N processes (torch.distributed.run, gloo, the cores
shared out) and steps `StackedMuon` in its default dtype, four ways in turn: on the matrices sharded by
FSDP2 (`Runtime.wrap`), the iteration of each matrix run by one rank, the matrices dealt out over the
ranks (pixformer's way), and all of them run by rank 0 (the work of a rank that iterates every matrix,
as each rank would if none were dealt out); on whole matrices replicated over the ranks (DDP), dealt out
(`replicas=`, what `pixformer train` passes) and iterated all on every rank; prints the median step of each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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
    p.add_argument("--ranks", type=int, default=1, help="above 1: StackedMuon under FSDP and DDP over this many processes")
    a = p.parse_args()
    if a.ranks > 1:
        return over_ranks(a)
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


def over_ranks(a: argparse.Namespace) -> None:
    """StackedMuon over --ranks processes: on FSDP2 shards and on replicated (DDP) matrices, each with its
    iteration dealt out over the ranks and without."""
    if "LOCAL_RANK" not in os.environ:                                # launch this script over --ranks processes
        threads = str(max(1, (os.cpu_count() or 1) // a.ranks))
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  str(a.ranks), *sys.argv], env={**os.environ, "OMP_NUM_THREADS": threads}))
    from pixformer import create_model
    from pixformer.engine import optim
    from pixformer.engine.perf import cpu_name
    from pixformer.engine.runtime import Runtime
    runtime = Runtime.create("cpu", fsdp=True)
    x = torch.rand(2, 3, a.img_size, a.img_size)

    def muon(sharded: bool, replicas=None) -> optim.StackedMuon:     # a model's matrices, their gradients set
        torch.manual_seed(0)
        model = create_model(a.model, img_size=a.img_size, num_classes=10)
        model = runtime.wrap(model) if sharded else model
        model(x).square().mean().backward()                           # the same gradients on every rank
        return optim.StackedMuon([w for w in model.parameters() if id(w) in optim.muon_matrices(model)],
                                 replicas=replicas, lr=2e-3, adjust_lr_fn="match_rms_adamw")
    dealt, alone = optim._owners, lambda mesh: 1
    ways = {"FSDP: dealt out over the ranks": (muon(True), dealt), "FSDP: all on rank 0": (muon(True), alone),
            "DDP: dealt out over the ranks": (muon(False, torch.distributed.group.WORLD), dealt),
            "DDP: all on every rank": (muon(False), dealt)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(a.rounds + 1):                                     # 1 warm-up round
        for name, (opt, owners) in ways.items():
            optim._owners = owners
            torch.distributed.barrier()
            t = time.perf_counter()
            opt.step()
            torch.distributed.barrier()
            if r >= 1:
                times[name].append(time.perf_counter() - t)
    optim._owners = dealt
    if runtime.is_main:
        count = len(ways["DDP: all on every rank"][0].param_groups[0]["params"])
        print(f"{a.model}: {count} matrices over {a.ranks} processes; {cpu_name()}, "
              f"{torch.get_num_threads()} thread(s) each, {a.rounds} interleaved rounds")
        for name, ts in times.items():
            base = statistics.median(times["FSDP: all on rank 0" if name.startswith("FSDP") else "DDP: all on every rank"])
            med = statistics.median(ts)
            print(f"{name:<31} step {1e3 * med:9.1f} ms  ({base / med:4.2f}x)")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
