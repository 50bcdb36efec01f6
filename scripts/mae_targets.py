"""Which MAE reconstruction target suits pixel tokens? At a CPU budget: pretrain the same PiT with each
target normalisation (none, local) on the bundled digits, then linear-probe each encoder the
same way, and print the probe's accuracy (the quality of the features) and the masked reconstruction
error in pixel space. A run folder per point under OUT; finished points are read back.

    .venv/bin/python scripts/mae_targets.py [--out runs/mae-targets] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pixformer import TrainConfig, train
from pixformer.engine.checkpoint import find_checkpoint

ENCODER = dict(model="pit-n", data="digits", model_args=dict(depth=4, dim=64, heads=4, pos_embed="sincos2d"),
               precision="fp32", progress=False)
# MAE's betas, weight decay and schedule shape; the learning rate is ours (the reference's 1.5e-4 x batch / 256
# is tuned for batch 4096 and hundreds of epochs)
PRETRAIN = dict(task="mae", epochs=40, batch_size=64, lr=1e-3, min_lr=0.0, weight_decay=0.05, betas=(0.9, 0.95),
                warmup_epochs=4, clip_grad=0.0)
PROBE = dict(task="probe", epochs=30, batch_size=64, lr=0.01, weight_decay=0.0, warmup_epochs=2)


def run(cfg: TrainConfig) -> dict:
    out = Path(cfg.out)
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    result = train(TrainConfig(**{**cfg.__dict__, "resume": find_checkpoint(out) is not None}))
    keep = {k: v for k, v in result.items() if k.startswith(("val_", "test_"))}
    done.write_text(json.dumps(keep))
    return keep


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/mae-targets")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--targets", nargs="+", default=["none", "local"])   # patch: undefined for 1-channel pixels
    args = ap.parse_args()
    rows = []
    for target in args.targets:
        probes, losses = [], []
        for seed in args.seeds:
            base = Path(args.out) / f"{target}-seed{seed}"
            mae = run(TrainConfig(**ENCODER, **PRETRAIN, seed=seed, task_args=dict(target=target), out=str(base / "mae")))
            probe = run(TrainConfig(**ENCODER, **PROBE, seed=seed, init=str(base / "mae"), out=str(base / "probe")))
            probes.append(probe["test_top1"])
            losses.append(mae["test_loss"])
        rows.append({"target": target, "probe_test_top1": statistics.fmean(probes), "probe_runs": probes,
                     "pixel_mse": statistics.fmean(losses), "seeds": args.seeds})
        print(f"target {target:<6} linear probe test top1 {100 * rows[-1]['probe_test_top1']:.2f} % "
              f"({', '.join(f'{100 * p:.2f}' for p in probes)})  masked pixel MSE {rows[-1]['pixel_mse']:.4f}", flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
