"""The attention backends side by side: forward + backward time, the memory each keeps for the
backward pass, and the error against an fp64 reference, for PiT-T's attention shapes (3 heads of 64)
at 8x8 to 64x64 pixels (65 to 4,097 tokens with the class token), in fp32 and bf16.

    .venv/bin/python benchmarks/attention.py                  # ~3 min on 2 cores
    .venv/bin/python benchmarks/attention.py --tokens 257 1025 --dtypes bf16
    .venv/bin/python benchmarks/attention.py --tokens 1025 --batch 16 --heads 4 32 --dtypes bf16   # MAE's decoder
    .venv/bin/python benchmarks/attention.py --dtypes bf16 --backends blocked --pad-above 100000 --no-flash-forward

This is the evidence behind the "auto" backend (src/pixformer/models/attention.py): which kernel is the
faster at which size and dtype on this machine, under the malloc policy `pixformer train` sets
(`--allocator`). Columns:
  ms        median time of attention forward + backward (of --reps), one thread per core; fwd, bwd:
            the medians of each part alone
  GFLOP/s   4*B*H*N*N*Dh forward FLOPs, x3 for forward + backward, over that time
  kept      bytes autograd keeps for the backward pass (q, k, v and the output included; "math" also
            keeps the B x H x N x N probabilities)
  max err   largest absolute difference of the output from fp64 "math" on the same inputs
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from pixformer.engine.perf import set_allocator
from pixformer.models.attention import attention, auto_backend

HEADS, DIM_HEAD = 3, 64
MATH_LIMIT = 1 << 27          # "math" is skipped above this many scores (0.5 GiB of fp32 per copy)


def kept_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs its forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure(backend: str, q, k, v, grad, reps: int) -> dict:
    def run() -> tuple[float, float]:
        t = time.perf_counter()
        out, _ = attention(q, k, v, backend=backend)
        t_fwd = time.perf_counter()
        out.backward(grad)
        return t_fwd - t, time.perf_counter() - t_fwd
    run()                                                            # warm-up
    times = [run() for _ in range(reps)]
    median = lambda xs: 1e3 * sorted(xs)[len(xs) // 2]              # noqa: E731
    out, kept = kept_bytes(lambda: attention(q, k, v, backend=backend)[0])
    exact, _ = attention(q.detach().double(), k.detach().double(), v.detach().double(), backend="math")
    return {"ms": median([f + b for f, b in times]), "fwd_ms": median([f for f, _ in times]),
            "bwd_ms": median([b for _, b in times]), "kept": kept,
            "max_err": (out.detach().double() - exact).abs().max().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[65, 257, 1025, 4097])
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="per token count (default 32, 8 above 2,048)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--backends", nargs="+", default=["sdpa", "blocked", "math"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--allocator", default="auto", help="glibc malloc policy, as `pixformer train --allocator` "
                    "(default auto = keep: freed blocks stay in the heap; system: glibc's own)")
    ap.add_argument("--heads", type=int, nargs=2, default=[HEADS, DIM_HEAD], metavar=("H", "DH"),
                    help="heads and their width (default PiT-T's 3 of 64)")
    ap.add_argument("--pad-above", type=int, default=None, metavar="N",
                    help="pad more than N keys to a multiple of 32 in the blocked kernel (default its own "
                         "KEY_ALIGN_ABOVE; a large N turns the padding off)")
    ap.add_argument("--no-flash-forward", action="store_true",
                    help="the blocked kernel computes its forward in blocks on CPUs with AMX too")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    args = ap.parse_args()
    set_allocator(args.allocator)
    A = importlib.import_module("pixformer.models.attention")      # the module (the package exports the function)
    if args.pad_above is not None:
        A.KEY_ALIGN_ABOVE = args.pad_above
    if args.no_flash_forward:
        A._amx = lambda: False
    heads, dim_head = args.heads
    batches = args.batch or [8 if n > 2048 else 32 for n in args.tokens]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; {heads} heads of {dim_head}; "
          f"allocator {args.allocator}")
    head = (f"{'tokens':>6} {'batch':>5} {'dtype':<5} {'backend':<8} {'ms':>8} {'fwd':>7} {'bwd':>7} {'GFLOP/s':>8} "
            f"{'kept MiB':>9} {'max err':>8}  auto")
    print(head + "\n" + "-" * len(head))
    rows = []
    for n, b in zip(args.tokens, batches):
        for name in args.dtypes:
            torch.manual_seed(0)
            dtype = dtypes[name]
            q, k, v = (torch.randn(b, heads, n, dim_head, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(b, heads, n, dim_head, dtype=dtype)
            auto = auto_backend("cpu", dtype, b * heads * n * n)
            for backend in args.backends:
                row = {"tokens": n, "batch": b, "dtype": name, "backend": backend, "auto": auto == backend}
                if backend == "math" and b * heads * n * n > MATH_LIMIT:
                    rows.append({**row, "skipped": f"{b * heads * n * n * q.element_size() / 2 ** 30:.1f} GiB "
                                                   "of scores"})
                    print(f"{n:>6} {b:>5} {name:<5} {backend:<8} skipped: {rows[-1]['skipped']}")
                    continue
                r = {**row, **measure(backend, q, k, v, grad, args.reps)}
                r["gflop_s"] = 3 * 4 * b * heads * n * n * dim_head / r["ms"] / 1e6
                rows.append(r)
                print(f"{n:>6} {b:>5} {name:<5} {backend:<8} {r['ms']:>8.1f} {r['fwd_ms']:>7.1f} {r['bwd_ms']:>7.1f} "
                      f"{r['gflop_s']:>8.0f} "
                      f"{r['kept'] / 2 ** 20:>9.1f} {r['max_err']:>8.1e}  {'<- auto' if r['auto'] else ''}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
                                          "allocator": args.allocator, "command": " ".join(sys.argv),
                                          "key_align_above": A.KEY_ALIGN_ABOVE, "flash_forward": A._amx(),
                                          "heads": heads, "dim_head": dim_head, "rows": rows}, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
