"""fp32 linear layers on CPU: torch's default GEMM (MKL) against the oneDNN custom op
(`--onednn-linear`), one training step (forward, backward, AdamW), median of the timed steps:

    small   the demo's ViT (4 layers, width 64, 4 heads), 8x8 one-channel images, patch 4, batch 16:
            a step this small is dominated by per-op dispatch
    pit-t   PiT-T at 16x16 (256 pixel tokens), batch 32: a step dominated by GEMMs

    .venv/bin/python benchmarks/linear_backend.py [--threads 1]

Which is faster depends on the CPU: `perf.onednn_pays` turns oneDNN on where it was measured to help
(AMD CPUs with AVX-512, where MKL runs its AVX2 code).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from pixformer import create_model
from pixformer.engine.optim import adamw
from pixformer.engine.perf import apply_speed_settings, onednn_pays

CASES = {"small": dict(name="vit-n/4", img=8, chans=1, batch=16, kw=dict(depth=4, dim=64, heads=4), steps=100, warm=20),
         "pit-t": dict(name="pit-t", img=16, chans=3, batch=32, kw={}, steps=5, warm=2)}


def step_time(case: dict, onednn: bool) -> float:
    torch.manual_seed(0)
    model = create_model(case["name"], img_size=case["img"], in_chans=case["chans"], num_classes=10, **case["kw"])
    apply_speed_settings(model, onednn_linear=onednn, selective_checkpoint=False)
    opt = adamw(model.parameters(), lr=1e-3)
    x = torch.randn(case["batch"], case["chans"], case["img"], case["img"])
    y = torch.randint(0, 10, (case["batch"],))
    times = []
    for i in range(case["warm"] + case["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i >= case["warm"]:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vendor = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("vendor_id")), "?") \
        if platform.system() == "Linux" else platform.processor()
    out = {"cpu_vendor": vendor, "threads": torch.get_num_threads(), "onednn_pays": onednn_pays(), "torch": torch.__version__}
    for name, case in CASES.items():
        mkl, onednn = step_time(case, False), step_time(case, True)
        out[name] = {"default_gemm_ms": 1000 * mkl, "onednn_ms": 1000 * onednn}
        print(f"{name:<6} default GEMM {1000 * mkl:9.1f} ms/step   oneDNN {1000 * onednn:9.1f} ms/step", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
