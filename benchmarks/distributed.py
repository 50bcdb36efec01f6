"""Sequence parallelism (LSS) and data parallelism on this machine: per-rank memory, step time and
communication of one PiT-T training step (forward, backward, gradient averaging, AdamW), each
configuration a torchrun launch over gloo with one thread per rank.

    sp1, sp2, sp4   one image split over P = 1, 2, 4 ranks (engine/sequence.py, contiguous shards), the
                    layers regathering their keys and values as train's default (--seq-regather auto) picks
    sp2-keep, sp4-keep           every layer keeps the gathered keys and values (--seq-regather none)
    sp2-regather, sp4-regather   none keeps them: every layer gathers them again in backward (all)
    ddp2            two ranks, one image each (DistributedDataParallel)
    collectives     2 ranks: bytes sent for an 8 MiB all-gather, reduce-scatter and all-reduce (not per side)
    ddp2-vit-b, fsdp2-vit-b   ViT-B/8 at the first side, 2 ranks: DDP against FSDP2 (train --fsdp), where the
                    weights, gradients and AdamW state are most of the memory

Per rank: the activation memory (bytes autograd keeps for the backward after the forward, counted by
saved_tensors_hooks, each storage once, weights and their bf16 copies left out), the peak resident memory of the process (all of it: torch,
gloo, weights, AdamW state), the median step time, and the bytes that crossed the loopback interface
per step and rank (all of gloo's traffic, measured in /proc/net/dev) next to the planner's estimate
(engine/plan.py). Each sequence-parallel row is printed with its activations against P = 1's and its
step time against the keep-all row of its P. With 2 cores, 4 ranks oversubscribe the machine: compare
memory there, not time.
The longest side that fits a per-rank budget comes from the planner, checked against these runs.

    .venv/bin/python benchmarks/distributed.py [--sides 32 64] [--steps 3] [--out benchmarks/results/distributed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BIG = "vit-b/8"   # 86 M parameters: its weights, gradients and AdamW state outweigh the activations at 32x32
CONFIGS = {"collectives": (2, 1, "none"), "ddp2-vit-b": (2, 1, "none"), "fsdp2-vit-b": (2, 1, "none"),
           "sp1": (1, 1, "none"), "sp2-keep": (2, 2, "none"), "sp2": (2, 2, "auto"), "sp2-regather": (2, 2, "all"),
           "sp4-keep": (4, 4, "none"), "sp4": (4, 4, "auto"), "sp4-regather": (4, 4, "all"),
           "ddp2": (2, 1, "none")}   # name: (ranks, ranks per image, --seq-regather)
ONCE = ("collectives", "ddp2-vit-b", "fsdp2-vit-b")                      # at the first side only


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])                  # transmitted bytes
    return 0


def collectives(a) -> None:
    """Bytes each rank sends for 8 MiB collectives over gloo: a ring all-gather / reduce-scatter sends
    (P-1)/P of the full tensor, an all-reduce twice that."""
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    full, world = 2 * 2 ** 20, dist.get_world_size()                 # 8 MiB of fp32
    row = {}
    for name, run in (("all_gather", lambda: dist.all_gather_into_tensor(torch.empty(full), torch.ones(full // world))),
                      ("reduce_scatter", lambda: dist.reduce_scatter_tensor(torch.empty(full // world), torch.ones(full))),
                      ("all_reduce", lambda: dist.all_reduce(torch.ones(full)))):
        dist.barrier()
        sent0 = loopback_bytes()
        run()
        dist.barrier()
        row[f"{name}_mib_per_rank"] = (loopback_bytes() - sent0) / world / 2 ** 20
    row["ring_mib_per_rank"] = 8 * (world - 1) / world
    (Path(a.results) / f"rank{dist.get_rank()}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def worker(a) -> None:
    import resource

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from harness import time_steps
    from pixformer.engine.optim import adamw
    from pixformer.engine.runtime import Runtime
    from pixformer.engine.sequence import SequenceParallel, average_gradients
    from pixformer.models.registry import create_model
    from pixformer.models.attention import set_attention_backend

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ranks, P, regather = CONFIGS[a.worker]
    torch.manual_seed(0)
    name = BIG if a.worker.endswith("vit-b") else "pit-t"
    layers = planned(a, a.worker).regather_layers["none"]   # what train runs (no checkpointing at these sizes)
    runtime = Runtime.create("cpu", fsdp=a.worker.startswith("fsdp2"))
    with runtime.building():                      # as train builds it: under FSDP2 whole on rank 0 alone
        model = set_attention_backend(create_model(name, img_size=a.side, num_classes=10), a.attn_backend)
    group = dist.new_subgroups(group_size=P)[0]
    if runtime.fsdp:
        step_model = runtime.wrap(model)          # what train --fsdp runs: shards in place
    elif P > 1:
        step_model = SequenceParallel(model, group, regather=layers)
    else:
        step_model = torch.nn.parallel.DistributedDataParallel(model)
    opt = adamw(model.parameters(), lr=1e-4)
    images, labels = torch.randn(1, 3, a.side, a.side), torch.tensor([3])
    amp = torch.bfloat16 if a.precision == "bf16" else None

    def forward():
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            return F.cross_entropy(step_model(images).float(), labels)

    kept: dict[int, int] = {}
    weights = {tuple(q.shape) for q in model.parameters()}

    def pack(t):
        if t.dim() <= 2 and tuple(t.shape) in weights:    # a weight (or its bf16 copy), not an activation
            return t
        try:
            s = t.untyped_storage()
            kept[s.data_ptr()] = s.nbytes()
        except RuntimeError:                              # a collective's output wrapper: its own bytes
            kept[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()                                  # the activations one step keeps
    activation = sum(kept.values())
    loss.backward()
    opt.zero_grad(set_to_none=True)
    del loss

    def step(i):
        opt.zero_grad(set_to_none=True)                   # as train's step: before the forward
        loss = forward()
        loss.backward()
        if P > 1:
            average_gradients(model)
        opt.step()

    dist.barrier()
    sent0 = loopback_bytes()
    timing = time_steps(step, a.steps, warmup=0)
    dist.barrier()
    sent = (loopback_bytes() - sent0) / a.steps / ranks   # the machine's loopback: every rank's traffic
    row = {"rank": dist.get_rank(), "activation_bytes": activation, "step_s": timing["step_s"],
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
           "rss_before_steps_gib": timing["rss_before_steps_gib"],
           "loopback_bytes_per_rank_step": sent}
    (Path(a.results) / f"rank{dist.get_rank()}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def planned(a, name: str):
    """The planner's figures for configuration `name` at the side `a.side`."""
    from pixformer.engine.plan import plan
    ranks, P, regather = CONFIGS[name]
    return plan(BIG if name.endswith("vit-b") else "pit-t", a.side, ranks // P, precision=a.precision,
                attn_backend=a.attn_backend, seq_parallel=P, data_parallel=ranks // P, seq_regather=regather,
                fsdp=name.startswith("fsdp2"))


def launch(a, name: str) -> dict:
    ranks, P, regather = CONFIGS[name]
    with tempfile.TemporaryDirectory() as results:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), __file__,
               "--worker", name, "--side", str(a.side), "--steps", str(a.steps), "--precision", a.precision,
               "--attn-backend", a.attn_backend, "--results", results]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise SystemExit(f"{name} at {a.side}: failed\n{done.stderr[-2000:]}")
        per_rank = [json.loads(f.read_text()) for f in Path(results).glob("rank*.json")]
    if name == "collectives":
        return {"config": name, "ranks": ranks, **per_rank[0]}
    p = planned(a, name)
    return {"config": name, "side": a.side, "tokens": a.side ** 2, "ranks": ranks, "seq_parallel": P,
            "seq_regather": regather, "regather_layers": p.regather_layers.get("none", 0), "depth": p.depth,
            "planned_line": p.regather_line("none") if P > 1 else None,
            "activation_mib": max(r["activation_bytes"] for r in per_rank) / 2 ** 20,
            "peak_rss_gib": max(r["peak_rss_gib"] for r in per_rank),
            "peak_rss_gib_by_rank": [r["peak_rss_gib"] for r in sorted(per_rank, key=lambda r: r["rank"])],
            "peak_rss_before_steps_gib": max(r["rss_before_steps_gib"] for r in per_rank),
            "step_s": max(r["step_s"] for r in per_rank),
            "comm_mib_measured": sum(r["loopback_bytes_per_rank_step"] for r in per_rank) / len(per_rank) / 2 ** 20,
            "comm_mib_planned": sum(p.comm.values()) / 2 ** 20,
            "planned_image_mib": p.image_bytes["none"] / 2 ** 20, "planned_peak_gib": p.peak_bytes(ranks // P) / 2 ** 30,
            "planned_fixed_mib": p.fixed_bytes / 2 ** 20}


def against(row: dict, rows: list[dict]) -> str:
    """A sequence-parallel row's activations against P = 1's and its step time against the keep-all row
    of its P, at its side (those run before it)."""
    if row["seq_parallel"] == 1:
        return ""
    same = {r["config"]: r for r in rows if r.get("side") == row["side"]}
    one, keep = same.get("sp1"), same.get(f"sp{row['seq_parallel']}-keep")
    out = f"  layers regathering {row['regather_layers']}/{row['depth']}"
    if one:
        out += f"  activation {row['activation_mib'] / one['activation_mib']:.2f}x of P=1"
    if keep:
        out += f"  step {row['step_s'] / keep['step_s']:.2f}x of keep-all"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None)
    ap.add_argument("--results", default=None, help="(worker) the folder its row is written to")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--sides", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto: bf16 where this CPU computes it natively, else fp32 (as train's default)")
    ap.add_argument("--attn-backend", default="blocked", help="blocked: O(N) memory at every length")
    ap.add_argument("--memory", default="4GiB", help="the per-rank budget for the longest side (planner)")
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    ap.add_argument("--merge", action="store_true", help="keep the rows of other configurations already in --out")
    a = ap.parse_args()
    if a.precision == "auto":                  # the workers are given what it means here
        from pixformer.engine.perf import native_bf16
        a.precision = "bf16" if native_bf16("cpu") else "fp32"
    if a.worker:
        return collectives(a) if a.worker == "collectives" else worker(a)
    from pixformer.engine.perf import cpu_name
    from pixformer.engine.plan import largest_side
    rows = []
    if a.merge and Path(a.out).exists():
        rows = [r for r in json.loads(Path(a.out).read_text())["rows"] if r["config"] not in a.configs]
    for side in a.sides:
        a.side = side
        for name in [c for c in a.configs if c not in ONCE or side == a.sides[0]]:
            r = launch(a, name)
            rows.append(r)
            if name == "collectives":
                print("gloo, 8 MiB, MiB sent a rank: " + ", ".join(f"{k[:-13]} {v:.2f}" for k, v in r.items()
                                                                   if k.endswith("_mib_per_rank")), flush=True)
                continue
            print(f"{side:>3}x{side:<3} {name:<12} activation {r['activation_mib']:8.1f} MiB  peak RSS "
                  f"{r['peak_rss_gib']:.2f} GiB  step {r['step_s']:6.2f} s  comm {r['comm_mib_measured']:7.1f} MiB "
                  f"(planned {r['comm_mib_planned']:.1f})" + against(r, rows), flush=True)
    longest = {f"P={P} {again}": largest_side(
        "pit-t", a.memory, "none", precision=a.precision, attn_backend=a.attn_backend, seq_parallel=P,
        seq_regather=again) for P in (1, 2, 4) for again in ("none", "auto", "all") if P > 1 or again == "none"}
    print(f"longest square side under {a.memory} a rank (planner, no checkpointing): "
          + ", ".join(f"{k}: {s} px" for k, s in longest.items()))
    meta = {"machine": cpu_name(), "cpus": os.cpu_count(),
            "torch": __import__("torch").__version__, "precision": a.precision, "attn_backend": a.attn_backend,
            "command": "python " + " ".join(sys.argv), "longest_side_planned": longest,
            "memory_budget": a.memory}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
