"""Inference throughput on CPU: what `pixformer eval` and `pixformer predict` run for a classifier
against the other ways torch offers to run the same forward pass, PiT-T and ViT-T/2 at 32x32,
10 classes, a batch of 256 random images; each configuration in its own process.

    .venv/bin/python benchmarks/inference.py --models vit-t/2           # batch 256: ~3 min on 2 cores
    .venv/bin/python benchmarks/inference.py --models pit-t --batch 64  # 1,024 tokens an image: ~5 min
    .venv/bin/python benchmarks/inference.py --batch 8 --steps 1 --models vit-t/2    # does it work

Configurations (the model's forward alone, on images already normalised: reading and resizing
images is not timed):
  eager            model.eval() under torch.no_grad, fp32: the plain forward
  pixformer        what eval and predict run (engine.loop.evaluate, experiments.predict.Predictor):
                   model.eval() under torch.no_grad, autocast in the run's precision, "auto" here:
                   bf16 where the CPU has native bf16 (AMX or AVX512-BF16, perf.native_bf16), else
                   fp32 (then it equals eager); attention "auto" (perf.auto_backend)
  inference-mode   pixformer's, under torch.inference_mode instead of torch.no_grad
  bf16-weights     the weights and images cast to bf16 once, no autocast (autocast casts each weight
                   again in every forward); only where the CPU has native bf16 (emulated bf16 is
                   slower than fp32)
  compile          pixformer's, the whole model through torch.compile (inductor; its C++ is built
                   by the first forward, not timed)
  channels-last    pixformer's with the images and the model in channels-last memory format; only
                   the patch embedding is a convolution, so a ViT has little to gain

Figures: images/s from the median of --steps batches (after 2 untimed), the process's peak RSS,
and GFLOP/s with their share of this machine's matmul peak in the dtype the configuration computed
in (measured in the same run, harness.matmul_peaks): the FLOPs are VisionTransformer.flops, the
forward's matmuls, once per image. Ratios are against `pixformer` (what eval and predict run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform

from harness import matmul_peaks, peak_per_dtype, run_configs, say_peaks, time_steps

CONFIGS = {"eager": dict(grad="no_grad", precision="fp32"),
           "pixformer": dict(grad="no_grad", precision="auto"),
           "inference-mode": dict(grad="inference_mode", precision="auto"),
           "bf16-weights": dict(grad="no_grad", precision="bf16-weights"),
           "compile": dict(grad="no_grad", precision="auto", compile=True),
           "channels-last": dict(grad="no_grad", precision="auto", channels_last=True)}


def worker(name: str, model_name: str, batch: int, steps: int) -> dict:
    import torch

    from pixformer import create_model
    from pixformer.engine.perf import autocast_dtype

    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = create_model(model_name, img_size=32, num_classes=10).eval()
    fwd = model.flops()
    x = torch.randn(batch, 3, 32, 32)
    amp = autocast_dtype("auto", "cpu") if cfg["precision"] == "auto" else None
    dtype = amp or torch.float32
    if cfg["precision"] == "bf16-weights":
        model, x, dtype = model.to(torch.bfloat16), x.to(torch.bfloat16), torch.bfloat16
    if cfg.get("channels_last"):
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if cfg.get("compile"):
        model = torch.compile(model)
    grad = torch.inference_mode if cfg["grad"] == "inference_mode" else torch.no_grad

    def forward(i):
        with grad(), (torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()):
            model(x).float()
    t = time_steps(forward, steps)
    return {"config": name, "model": model_name, "batch": batch, **t, "images_s": batch / t["step_s"],
            "flop_s": fwd * batch / t["step_s"], "forward_flops": fwd, "precision": str(dtype)[6:],
            "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["pit-t", "vit-t/2"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed batches per configuration (median reported)")
    ap.add_argument("--configs", nargs="+", default=None, help=f"default: all of {list(CONFIGS)} that apply here")
    ap.add_argument("--out", default="benchmarks/results/inference.json", help="one file per model: _MODEL is added")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch, args.steps)))
        return
    from pixformer.engine.perf import native_bf16
    native = native_bf16("cpu")
    configs = args.configs or [c for c in CONFIGS if native or c != "bf16-weights"]
    print(f"{platform.processor() or platform.machine()}: native bf16 {'yes' if native else 'no'}, so `pixformer` "
          f"runs {'bf16 autocast' if native else 'fp32 (the same as eager)'}")
    by_lib = matmul_peaks("cpu")
    print(say_peaks(by_lib), flush=True)
    for m in args.models:
        print(f"{m} at 32x32, batch {args.batch}:")
        run_configs(__file__, configs, ["--model", m, "--batch", str(args.batch), "--steps", str(args.steps)],
                    args.out.replace(".json", f"_{m.replace('/', '')}.json"),
                    {"model": m, "native_bf16": native, "matmul_flop_s_by_library": by_lib}, "pixformer",
                    peak=peak_per_dtype(by_lib))


if __name__ == "__main__":
    main()
