"""One MAE pretraining step (forward, backward, AdamW) of pixformer's masked autoencoder against
transformers' ViTMAEForPreTraining at identical dimensions: PiT-T (depth 12, width 192, 3 heads, MLP
768, patch 1, class token) at 32x32 with 75 % of the 1,024 pixel tokens hidden, and the decoder
pixformer uses for that size (4 blocks of width 128, 4 heads, MLP 512), norm-pix loss. Each
configuration runs in a fresh process; the figures are the median step time (images/s) and the peak
resident memory of the process during the steps.

    .venv/bin/python benchmarks/mae_step.py [--batch 32] [--steps 5] [--out benchmarks/results/mae_step.json]
    .venv/bin/python benchmarks/mae_step.py --batch 16 --profile pixformer-fp32     # where one step's time goes

Configurations: pixformer as `pixformer train --task mae` runs it (its default precision and speed
settings, selective activation checkpointing where train's rule turns it on: the planner's count of
what the encoder's blocks over the visible tokens and the decoder's over all keep, plan.blocks_peak_bytes),
pixformer in fp32 (with train's other settings), pixformer's default with selective checkpointing,
pixformer's default with the MLP keeping both its hidden activations (`--lean-mlp false`), with the
`blocked` attention kernel in every layer (`auto` runs `math` in the encoder, which keeps the probabilities),
transformers in fp32 with its SDPA attention, and transformers under bf16 autocast. Each prints its
GFLOP/s (`mae_flops`, 3x forward, the same count for both: identical dimensions) and its share of this
machine's matmul peak in the dtype it ran, measured in the same run (harness.matmul_peaks), and the
ratios to transformers fp32 and to transformers in the same precision.
"""
from __future__ import annotations

import argparse
import json

from harness import matmul_peaks, peak_per_dtype, profile_step, run_configs, say_peaks, time_steps, train_step

DIMS = dict(img=32, patch=1, depth=12, dim=192, heads=3, mlp=768, dec_depth=4, dec_dim=128, dec_heads=4, dec_mlp=512,
            mask_ratio=0.75)
# selective: selective activation checkpointing on / off; unset: as train decides (plan.blocks_peak_bytes);
# lean: the lean MLP (default on, as in train); lean_norms: the norms' outputs recomputed (default off, as in
# train); attn: the attention backend (default auto, as in train)
# allocator: glibc malloc policy (perf.set_allocator; default auto, as in train)
CONFIGS = {"pixformer": dict(impl="pixformer", precision="auto"),
           "pixformer-fp32": dict(impl="pixformer", precision="fp32"),
           "pixformer-selective": dict(impl="pixformer", precision="auto", selective=True),
           "pixformer-no-lean": dict(impl="pixformer", precision="auto", lean=False),
           "pixformer-blocked": dict(impl="pixformer", precision="auto", attn="blocked"),
           "pixformer-lean-norms": dict(impl="pixformer", precision="auto", lean_norms=True),
           "pixformer-fp32-lean-norms": dict(impl="pixformer", precision="fp32", lean_norms=True),
           "pixformer-system-malloc": dict(impl="pixformer", precision="auto", allocator="system"),
           "transformers": dict(impl="transformers", precision="fp32"),
           "transformers-bf16": dict(impl="transformers", precision="bf16"),
           "transformers-bf16-keep-malloc": dict(impl="transformers", precision="bf16", allocator="keep")}


def mae_flops(dims: dict | None = None) -> int:
    """Forward matmul FLOPs of one image (a multiply-add counts as 2): the patch embedding of all N tokens,
    the encoder's blocks over the K visible tokens and the class token, the map to the decoder width,
    the decoder's blocks over the class token and all N positions, and the prediction of each token's
    pixels. A training step costs 3x this (the backward pass computes two products per forward one). `dims`:
    DIMS changed (smaller sizes for a test)."""
    from pixformer.models.mae import visible_count
    from pixformer.models.vit import block_flops
    d = {**DIMS, **(dims or {})}
    n, pix = (d["img"] // d["patch"]) ** 2, 3 * d["patch"] ** 2
    t_enc, t_dec = visible_count(n, d["mask_ratio"]) + 1, n + 1
    return (2 * n * pix * d["dim"] + d["depth"] * block_flops(t_enc, d["dim"], d["mlp"]) + 2 * t_enc * d["dim"] * d["dec_dim"]
            + d["dec_depth"] * block_flops(t_dec, d["dec_dim"], d["dec_mlp"]) + 2 * t_dec * d["dec_dim"] * pix)


def build(name: str, batch: int, device: str = "cpu", dims: dict | None = None):
    """The training step of configuration `name` at `batch` images on `device`: (step(i), model, autocast
    dtype or None); `dims`: DIMS changed."""
    import numpy as np
    import torch

    from pixformer.engine.optim import adamw

    cfg, d = CONFIGS[name], {**DIMS, **(dims or {})}
    torch.manual_seed(0)
    x = torch.randn(batch, 3, d["img"], d["img"]).to(device)
    n = (d["img"] // d["patch"]) ** 2
    if cfg["impl"] == "pixformer":
        from pixformer import Speed
        from pixformer.engine.optim import param_groups
        from pixformer.engine.perf import apply_speed_settings, autocast_dtype
        from pixformer.engine.plan import blocks_peak_bytes, selective_above
        from pixformer.tasks import DataFacts
        from pixformer.tasks.mae import MAE, MAETaskConfig
        task = MAE(MAETaskConfig(mask_ratio=d["mask_ratio"], target="patch", decoder_depth=d["dec_depth"],
                                 decoder_dim=d["dec_dim"], decoder_heads=d["dec_heads"]),
                   DataFacts([str(i) for i in range(10)], 3, (d["img"], d["img"]), [0.0] * 3, [1.0] * 3))
        model = task.build_model("pit-t", {"depth": d["depth"]}).to(device)
        selective = cfg.get("selective")
        if selective is None:                                                   # train's rule (loop.resolved_speed)
            selective = blocks_peak_bytes(model, task.block_tokens(model), batch, cfg["precision"],
                                          cfg.get("attn", "auto"), lean_norms=cfg.get("lean_norms", False)
                                          ) > selective_above(device)
        apply_speed_settings(model, Speed(selective_checkpoint=selective, lean_mlp=cfg.get("lean", True),
                                          lean_norms=cfg.get("lean_norms", False),
                                          attn_backend=cfg.get("attn", "auto"), allocator=cfg.get("allocator", "auto")))
        opt = adamw(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        amp = autocast_dtype(cfg["precision"], torch.device(device).type)

        def loss_of(i):
            return task.loss(model, x, None, np.random.default_rng(i))[0]
    else:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
        from pixformer.engine.perf import set_allocator
        set_allocator(cfg.get("allocator", "system"))            # as published: glibc's own policy, unless named
        model = ViTMAEForPreTraining(ViTMAEConfig(
            image_size=d["img"], patch_size=d["patch"], num_channels=3, hidden_size=d["dim"], num_hidden_layers=d["depth"],
            num_attention_heads=d["heads"], intermediate_size=d["mlp"], decoder_hidden_size=d["dec_dim"],
            decoder_num_hidden_layers=d["dec_depth"], decoder_num_attention_heads=d["dec_heads"],
            decoder_intermediate_size=d["dec_mlp"], mask_ratio=d["mask_ratio"], norm_pix_loss=True,
            layer_norm_eps=1e-6, attn_implementation="sdpa")).to(device)
        opt = adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        amp = torch.bfloat16 if cfg["precision"] == "bf16" else None

        def loss_of(i):
            noise = torch.from_numpy(np.random.default_rng(i).random((batch, n))).float().to(device)
            return model(pixel_values=x, noise=noise).loss
    model.train()
    return train_step(loss_of, opt, amp, device), model, amp


def worker(name: str, batch: int, steps: int) -> dict:
    import torch

    from pixformer.engine.perf import checkpointed_blocks
    step, model, amp = build(name, batch)
    t = time_steps(step, steps)
    return {"config": name, "batch": batch, **t, "images_s": batch / t["step_s"],
            "flop_s": 3 * mae_flops() * batch / t["step_s"],
            "precision": str(amp or torch.float32)[6:], "params": sum(p.numel() for p in model.parameters()),
            "selective_checkpoint": checkpointed_blocks(model)["selective"] > 0, "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--out", default="benchmarks/results/mae_step.json")
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out for configurations not run now")
    ap.add_argument("--profile", metavar="CONFIG", choices=list(CONFIGS),
                    help="instead of timing: profile one step of CONFIG in this process (torch.profiler, the ops "
                         "by their own CPU time)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        print(profile_step(build(args.profile, args.batch)[0]))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps)))
        return
    by_lib = matmul_peaks("cpu")
    print(say_peaks(by_lib), flush=True)
    run_configs(__file__, args.configs, ["--batch", str(args.batch), "--steps", str(args.steps)], args.out,
                {"dims": DIMS, "forward_flops": mae_flops(), "matmul_flop_s_by_library": by_lib}, "transformers",
                args.merge, peak=peak_per_dtype(by_lib), peers=tuple(c for c in CONFIGS if c.startswith("pixformer")))


if __name__ == "__main__":
    main()
