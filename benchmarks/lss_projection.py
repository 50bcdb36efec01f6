"""The LSS scale on paper: PiT-B and PiT-L at 224x224 (50,176 pixel tokens + a class token) split over
P = 8 ... 1,024 GPUs of 80 GB by sequence parallelism, one image per sequence group, every layer keeping
the keys and values gathered from the shards (LSS's layout, train --seq-regather none), bf16, fused (flash)
attention, from the planner (engine/plan.py; counted, not measured: see its module doc for what it
leaves out). Per rank: tokens held, memory of one training step without checkpointing and with every
block checkpointed, whether each fits 80 GB, the bytes each rank sends a step, and its share of the
training FLOPs (the queries, so the matmuls and attention scores, divide evenly over the ranks).

    .venv/bin/python benchmarks/lss_projection.py [--out benchmarks/results/lss_projection.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pixformer.engine.plan import format_bytes, parse_bytes, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["pit-b", "pit-l"])
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--memory", default="80GB")
    ap.add_argument("--out", default="benchmarks/results/lss_projection.json")
    a = ap.parse_args()
    budget = parse_bytes(a.memory)
    rows = []
    print(f"| model | P | tokens a rank | training TFLOP a rank | memory a rank, none | full checkpointing | "
          f"fits {a.memory} | key/value traffic a rank | gradient all-reduce |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for model in a.models:
        for P in a.ranks:
            p = plan(model, a.side, 1, budget, precision="bf16", attn_backend="sdpa", num_classes=1000, seq_parallel=P,
                     seq_regather="none")          # LSS's own layout: every layer keeps the gathered keys
            none, full = p.peak_bytes(1, "none"), p.peak_bytes(1, "full")
            fits = "yes" if none <= budget else "with full checkpointing" if full <= budget else "no"
            row = {"model": model, "P": P, "tokens_per_rank": -(-p.seq_len // P), "peak_none": none, "peak_full": full,
                   "fits": fits, "key_value_bytes": p.comm.get("key_value_gathers", 0),
                   "gradient_bytes": p.comm.get("gradient_all_reduce", 0), "params": p.params,
                   "train_flops_per_rank": p.train_flops / P}
            rows.append(row)
            print(f"| {model} | {P:,} | {row['tokens_per_rank']:,} | {row['train_flops_per_rank'] / 1e12:,.2f} | "
                  f"{format_bytes(none)} | {format_bytes(full)} | "
                  f"{fits} | {format_bytes(row['key_value_bytes'])} | {format_bytes(row['gradient_bytes'])} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "side": a.side,
                                       "memory": a.memory, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
