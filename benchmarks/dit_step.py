"""One DiT training step (noise, forward, epsilon MSE, backward, AdamW) of pixformer's DiT against
diffusers' DiTTransformer2DModel at identical dimensions: DiT-S (depth 12, width 384, 6 heads, MLP
1,536), class-conditional (1,000 classes), on a 32x32x4 latent grid, at patch 2 (`dit-s/2`, 256 tokens)
and patch 1 (the PiT variant, 1,024 tokens); and sampling throughput (images/s) of pixformer's model
with DDIM at 50 steps and DPM-Solver++ at 20, both with guidance (scale 1.5). pixformer's training
configurations run with the speed settings `pixformer train` applies (oneDNN linear layers in fp32 on AMD
CPUs with AVX-512, the allocator policy, selective activation checkpointing where train's rule turns it
on: plan.selective_pays). Each configuration runs in a fresh process; the figures are the median step
time (images/s), the process's peak resident memory, and GFLOP/s with its share of this machine's matmul
peak in the dtype the configuration ran (measured in the same run, harness.matmul_peaks). The FLOPs are
pixformer's DiT.flops (the token path's matmuls, the same for diffusers' model at identical dimensions;
the per-image timestep and class embeddings and adaLN modulation are left out): 3x forward per training
image, and for sampling one forward per image the model is called on (a guided step calls it on each
image twice).

    .venv/bin/python benchmarks/dit_step.py [--batch 8] [--steps 3] [--patches 2 1] [--out benchmarks/results/dit_step.json]
    .venv/bin/python benchmarks/dit_step.py --batch 4 --patches 1 --profile pixformer    # where one step's time goes
"""
from __future__ import annotations

import argparse
import json

from harness import matmul_peaks, peak_per_dtype, profile_step, run_configs, say_peaks, time_steps, train_step

DIMS = dict(img=32, chans=4, depth=12, dim=384, heads=6, classes=1000)
# selective: selective activation checkpointing on / off; unset: as train decides (plan.selective_pays)
# allocator: glibc malloc policy (perf.set_allocator; default auto, as in train); attn: the attention backend
# (default auto, as in train); lean_norms: the norms' outputs recomputed in the backward (default off, as in train)
CONFIGS = {"pixformer": dict(impl="pixformer", precision="auto"),
           "pixformer-fp32": dict(impl="pixformer", precision="fp32"),
           "pixformer-selective": dict(impl="pixformer", precision="auto", selective=True),
           "pixformer-blocked": dict(impl="pixformer", precision="auto", attn="blocked"),
           "pixformer-lean-norms": dict(impl="pixformer", precision="auto", lean_norms=True),
           "pixformer-fp32-lean-norms": dict(impl="pixformer", precision="fp32", lean_norms=True),
           "pixformer-system-malloc": dict(impl="pixformer", precision="auto", allocator="system"),
           "diffusers": dict(impl="diffusers", precision="fp32"),
           "diffusers-bf16": dict(impl="diffusers", precision="bf16"),
           "diffusers-bf16-keep-malloc": dict(impl="diffusers", precision="bf16", allocator="keep"),
           "sample-ddim50": dict(impl="sample", sampler="ddim", steps=50, precision="auto"),
           "sample-dpm20": dict(impl="sample", sampler="dpm-solver", steps=20, precision="auto")}


def build(name: str, patch: int, batch: int, device: str = "cpu", dims: dict | None = None):
    """Configuration `name` at `patch` and `batch` images on `device`: (step(i), model, autocast dtype or None,
    flops() the forward FLOPs of one image); step(i) is a training step, or for the sample-* configurations one
    batch sampled. `dims`: DIMS changed (smaller sizes for a test)."""
    import numpy as np
    import torch

    from pixformer.engine.optim import adamw, param_groups
    from pixformer.engine.perf import autocast_dtype
    from pixformer.tasks import DataFacts
    from pixformer.tasks.diffusion import Diffusion, DiffusionConfig

    cfg, d = CONFIGS[name], {**DIMS, **(dims or {})}
    torch.manual_seed(0)
    facts = DataFacts([str(i) for i in range(d["classes"])], d["chans"], (d["img"], d["img"]), [0.5] * d["chans"],
                      [0.5] * d["chans"])
    task = Diffusion(DiffusionConfig(), facts)
    x = torch.randn(batch, d["chans"], d["img"], d["img"]).to(device)
    y = (torch.arange(batch) % d["classes"]).to(device)
    kind = torch.device(device).type
    amp = autocast_dtype(cfg["precision"], kind) if cfg["precision"] != "bf16" else torch.bfloat16
    sizes = dict(depth=d["depth"], dim=d["dim"], heads=d["heads"], patch_size=patch)
    if cfg["impl"] in ("pixformer", "sample"):
        from pixformer import Speed
        from pixformer.engine.perf import apply_speed_settings
        from pixformer.engine.plan import selective_above, selective_pays
        model = task.build_model("dit-s/2", sizes).to(device)
        if cfg["impl"] == "pixformer":                 # train's speed settings, selective checkpointing by its rule
            selective = cfg.get("selective")
            if selective is None:
                selective = selective_pays("dit-s/2", d["img"], batch, "bf16" if amp else "fp32",
                                           num_classes=d["classes"], in_chans=d["chans"], above=selective_above(device),
                                           lean_norms=cfg.get("lean_norms", False), **sizes)
            apply_speed_settings(model, Speed(selective_checkpoint=selective, allocator=cfg.get("allocator", "auto"),
                                              lean_norms=cfg.get("lean_norms", False),
                                              attn_backend=cfg.get("attn", "auto")))
        opt = adamw(param_groups(model, 0.0), lr=1e-4)

        def loss_of(i):
            return task.loss(model, x, y, np.random.default_rng(i))[0]
    else:
        from diffusers import DiTTransformer2DModel
        from pixformer.engine.perf import set_allocator
        set_allocator(cfg.get("allocator", "system"))            # as published: glibc's own policy, unless named
        model = DiTTransformer2DModel(num_attention_heads=d["heads"], attention_head_dim=d["dim"] // d["heads"],
                                      in_channels=d["chans"], out_channels=d["chans"], num_layers=d["depth"],
                                      sample_size=d["img"], patch_size=patch, num_embeds_ada_norm=d["classes"]).to(device)
        opt = adamw(model.parameters(), lr=1e-4)

        def loss_of(i):
            rng = np.random.default_rng(i)
            t = torch.from_numpy(rng.integers(0, 1000, batch)).to(device)
            noise = torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32)).to(device)
            x0 = task.to_model_space(x)
            out = model(task.noise.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
            return ((out.float() - noise) ** 2).mean()
    flops = lambda: (model if cfg["impl"] != "diffusers" else task.build_model("dit-s/2", sizes)).flops()  # noqa: E731
    if cfg["impl"] == "sample":
        model.eval()

        def step(i):
            with torch.autocast(kind, dtype=amp or torch.float32, enabled=amp is not None):
                task.sample(model, batch, y, cfg_scale=1.5, sampler=cfg["sampler"], steps=cfg["steps"], seed=i)
        return step, model, amp, flops
    model.train()
    return train_step(loss_of, opt, amp, device), model, amp, flops


def worker(name: str, patch: int, batch: int, steps: int) -> dict:
    import torch

    from pixformer.engine.perf import checkpointed_blocks
    step, model, amp, flops_of = build(name, patch, batch)
    sample = CONFIGS[name]["impl"] == "sample"
    params = sum(p.numel() for p in model.parameters())
    forwarded = [0]                                        # images the model is called on, over every step
    model.register_forward_pre_hook(lambda m, args: forwarded.__setitem__(0, forwarded[0] + len(args[0])))
    t = time_steps(step, steps, warmup=1 if sample else 2)
    per_step = forwarded[0] / (len(t["step_times"]) + len(t["warmup_s"]))   # images through the model per step
    fwd = flops_of()
    flops = per_step * fwd * (1 if sample else 3)                           # training: forward + backward (2x)
    return {"config": name, "patch": patch, "batch": batch, **t, "images_s": batch / t["step_s"],
            "forward_flops": fwd, "flop_s": flops / t["step_s"], "precision": str(amp or torch.float32)[6:],
            "params": params, "selective_checkpoint": checkpointed_blocks(model)["selective"] > 0,
            "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--patches", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--out", default="benchmarks/results/dit_step.json")
    ap.add_argument("--merge", action="store_true", help="keep the rows of each --out file for configurations not run now")
    ap.add_argument("--profile", metavar="CONFIG", choices=list(CONFIGS),
                    help="instead of timing: profile one step of CONFIG at the first of --patches in this process "
                         "(torch.profiler, the ops by their own CPU time)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--patch", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        print(profile_step(build(args.profile, args.patches[0], args.batch)[0]))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.patch, args.batch, args.steps)))
        return
    by_lib = matmul_peaks("cpu")
    print(say_peaks(by_lib), flush=True)
    for p in args.patches:
        print(f"patch {p} ({(DIMS['img'] // p) ** 2} tokens), batch {args.batch}:")
        out = args.out.replace(".json", f"_p{p}.json")
        run_configs(__file__, args.configs, ["--patch", str(p), "--batch", str(args.batch), "--steps", str(args.steps)],
                    out, {"dims": {**DIMS, "patch": p}, "matmul_flop_s_by_library": by_lib}, "diffusers",
                    args.merge, peak=peak_per_dtype(by_lib), peers=tuple(c for c in CONFIGS if c.startswith("pixformer")))


if __name__ == "__main__":
    main()
