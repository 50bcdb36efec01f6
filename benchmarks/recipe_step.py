"""A recipe's training step under variants of its speed switches: what a switch costs or saves in the
run a config file describes (model, batch, precision, optimizer, task loss, all as `pixformer train`
builds them), at one image side.

    .venv/bin/python benchmarks/recipe_step.py --config configs/cifar10-speedrun.yaml --side 32 \\
        --variants "" lean_mlp=true

Each variant is a set of `Speed` fields (`name=value`, comma-separated; "" = the config's own), and
may set `accum_steps` (the step in that many micro-batches, as `--accum-steps` runs it). All
variants are built in one process and their steps interleaved, round after round, so that a drift
in the machine's speed (other tenants, clock changes) falls on all of them alike; the median step of
each is printed with its ratio to the first variant, the CPU named. Synthetic images and labels: the
step's cost does not depend on their values. The optimizer's own share of the step is printed too.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import types

import torch


def load_config(path: str):
    """The TrainConfig a `pixformer train --config path` run would use (no data read)."""
    from pixformer.cli import build_parser
    from pixformer.engine.config import config_from_options, init_options
    ns = build_parser().parse_args(["train", "--config", path])
    values, _ = init_options(ns.train.as_dict(), ns.train.as_dict())
    return config_from_options(values)


def build(cfg, speed_fields: dict, classes: int = 10):
    """(model, optimizer, task, amp, config) as train builds them, with `speed_fields` over the config's
    (`accum_steps` among them: the config's own field)."""
    from pixformer.engine import Runtime
    from pixformer.engine.loop import resolved_speed
    from pixformer.engine.optim import build_optimizer
    from pixformer.engine.perf import apply_speed_settings, autocast_dtype
    from pixformer.tasks import get_task, task_config
    from pixformer.tasks.base import DataFacts
    facts = DataFacts([str(i) for i in range(classes)], 3, (cfg.img_size, cfg.img_size), [0.5] * 3, [0.25] * 3)
    task = get_task(cfg.task)(task_config(cfg.task, cfg.task_args), facts)
    torch.manual_seed(cfg.seed)
    model = task.build_model(cfg.model, cfg.model_args)
    amp = autocast_dtype(cfg.precision, "cpu")
    speed_fields = dict(speed_fields)
    cfg = dataclasses.replace(cfg, accum_steps=speed_fields.pop("accum_steps", cfg.accum_steps),
                              speed=dataclasses.replace(cfg.speed, **speed_fields))
    apply_speed_settings(model, **resolved_speed(cfg, Runtime.create("cpu"), facts, amp, task, model))   # as train
    return model, build_optimizer(model, cfg), task, amp, cfg


def parse_variant(text: str) -> dict:
    """'lean_mlp=false,attn_backend=math' -> {'lean_mlp': False, 'attn_backend': 'math'}."""
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=", 1)
        out[k] = {"true": True, "false": False, "none": None}.get(v.lower(), int(v) if v.isdigit() else v)
    return out


def main() -> None:
    from pixformer.engine import Runtime
    from pixformer.engine.loop import forward_backward
    from pixformer.engine.perf import cpu_name
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cifar10-speedrun.yaml")
    p.add_argument("--side", type=int, default=32, help="the training image side (the model is built at the "
                   "config's --img-size, or this side where it sets none, and takes a smaller side as "
                   "progressive resizing feeds it)")
    p.add_argument("--variants", nargs="+", default=["", "lean_mlp=true"], help="Speed fields per variant")
    p.add_argument("--rounds", type=int, default=25, help="timed steps per variant (interleaved)")
    a = p.parse_args()
    cfg = load_config(a.config)
    if cfg.img_size is None:                              # a config that takes its size from the data
        cfg = dataclasses.replace(cfg, img_size=a.side)
    x = torch.randn(cfg.batch_size, 3, a.side, a.side)
    y = torch.randint(0, 10, (cfg.batch_size,))
    runs = []
    for text in a.variants:
        model, opt, task, amp, vcfg = build(cfg, parse_variant(text))
        times: dict[str, list[float]] = {"step": [], "optimizer": []}
        run = types.SimpleNamespace(cfg=vcfg, runtime=Runtime.create("cpu"), task=task, step_model=model, amp=amp,
                                    part=slice(0, len(y)), step=0)   # what train's forward_backward reads of a run

        def step(model=model, opt=opt, run=run, times=times):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            forward_backward(run, x, y, len(y))                             # as train's step
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            times["step"].append(t2 - t0)
            times["optimizer"].append(t2 - t1)
        runs.append((text or "(the config's own)", step, times))
    for _, step, times in runs:                           # warm-up
        for _ in range(3):
            step()
        for kept in times.values():
            kept.clear()
    for _ in range(a.rounds):
        for _, step, _ in runs:
            step()
    print(f"{a.config} at {a.side}x{a.side}, batch {cfg.batch_size}, precision {cfg.precision}, optimizer "
          f"{cfg.optimizer}; {cpu_name()}, {torch.get_num_threads()} threads, {a.rounds} interleaved rounds")
    first = statistics.median(runs[0][2]["step"])
    for name, _, times in runs:
        med = statistics.median(times["step"])
        print(f"{name:<40} step {1e3 * med:7.1f} ms  ({med / first:.3f}x)  optimizer "
              f"{1e3 * statistics.median(times['optimizer']):5.1f} ms")


if __name__ == "__main__":
    main()
