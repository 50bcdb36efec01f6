"""The training loop every task shares, one plain function you can read in one sitting.

    import pixformer
    result = pixformer.train(pixformer.TrainConfig(model="pit-n", data="digits", epochs=30, out="runs/pit"))

The loop owns AdamW and its parameter groups, warm-up + cosine, precision, the speed switches, EMA,
gradient clipping, checkpoints and exact resume, SIGTERM / Ctrl-C, metrics.jsonl and TensorBoard,
the progress bar and the validation cadence. The task (pixformer.tasks) owns the model it trains,
the loss of a batch and its evaluation metrics. Validation uses the val split (never test); the test
split, where the data has one, is evaluated once at the end and reported apart (`test_*`).
"""
from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.ablations import permuted
from ..data.augment import batch_indices, random_crop, random_flip
from ..data.native import NativeBatcher, NativeSet, batcher_for, table_side
from ..data.sources import ImageSet, load_source
from ..data.splits import Splits, channel_stats, resolve_splits, source_id
from ..errors import PixformerError
from ..models import blocks_of
from ..models.attention import check_sequence_backend, set_attention_backend
from ..models.imports import foreign_format
from ..models.registry import check_model_args, model_name, model_spec, resolve
from ..tasks import DataFacts, Task, get_task, task_config
from ..tasks.base import ExampleRandom
from .checkpoint import (find_checkpoint, init_from, load_tensors, load_weights, optimizer_from_files, read_state,
                         save_checkpoint, summarize_keys)
from .config import TrainConfig, as_json, changed_settings
from .perf import apply_speed_settings, autocast_dtype, onednn_pays
from .plan import selective_pays
from .runtime import RankRandom, Runtime


# ---- data ----------------------------------------------------------------------------------
@dataclass
class Prepared:
    splits: Splits              # train (after --train-subset), val, test (or None)
    facts: DataFacts


def prepare_data(cfg: TrainConfig) -> Prepared:
    """Load the source, resolve its train / val / test splits, apply a subset and a pixel permutation
    if asked, and compute the normalisation on the training images. At native resolution the splits
    are NativeSets and the facts' image size is the square the position table is laid out for under
    the budgets (native.table_side)."""
    size = (cfg.img_size, cfg.img_size) if cfg.img_size else None
    found = load_source(cfg.data, cfg.data_root, size, cfg.skip_bad_images, native=cfg.native, max_side=cfg.max_side)
    s = resolve_splits(found, cfg.val_fraction, cfg.data)
    train = s.train
    if cfg.train_subset:
        if cfg.train_subset > len(train):
            raise PixformerError(f"--train-subset {cfg.train_subset} exceeds the {len(train)} training images")
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_subset]
        train = train.subset(idx.sort().values)
    if cfg.native:
        side = table_side(cfg.max_side, cfg.max_tokens, native_patch(cfg))
        mean, std = channel_stats(train.images)
        return Prepared(Splits(train, s.val, s.test, s.val_from), DataFacts(train.classes, train.in_chans, (side, side), mean, std))
    s = Splits(permuted(train, cfg), permuted(s.val, cfg), None if s.test is None else permuted(s.test, cfg), s.val_from)
    mean, std = channel_stats(s.train.images)
    facts = DataFacts(s.train.classes, s.train.images.shape[1], tuple(s.train.images.shape[-2:]), mean, std)
    return Prepared(s, facts)


def native_patch(cfg: TrainConfig) -> int:
    """The patch size of a native-resolution run's model, or a clear error for what cannot run there."""
    arch, fields = resolve(cfg.model)
    if arch != "vit" or cfg.task != "classify":
        raise PixformerError(f"native resolution (--max-side / --max-tokens) packs images for a ViT classifier "
                             f"(--task classify, vit-*/p or pit-*); got --task {cfg.task} with {cfg.model}")
    if cfg.img_size:
        raise PixformerError("native resolution (--max-side / --max-tokens) keeps each image's size: drop --img-size")
    if cfg.crop_padding:
        raise PixformerError("--crop-padding pads square images; at native resolution use --resolution-range instead")
    if cfg.permute_pixels or cfg.local_swaps:
        raise PixformerError("pixel permutations (--permute-pixels, --local-swaps) need images of one size")
    if cfg.task_args.get("mixup") or cfg.task_args.get("cutmix"):
        raise PixformerError("mixup and CutMix mix images of one size; turn them off at native resolution")
    return int(cfg.model_args.get("patch_size", fields["patch_size"]))


def check_parallel(cfg: TrainConfig) -> None:
    """A clear error for what sequence parallelism and FSDP2 cannot run (before any data is loaded)."""
    if cfg.seq_parallel > 1:
        arch, _ = resolve(cfg.model)
        if arch != "vit" or cfg.task != "classify" or cfg.native:
            raise PixformerError(f"--seq-parallel splits the tokens of a ViT classifier's square images (--task "
                                 f"classify, vit-*/p or pit-*, no --max-side / --max-tokens); got --task {cfg.task} "
                                 f"with {cfg.model}" + (" at native resolution" if cfg.native else ""))
        check_sequence_backend(cfg.speed.attn_backend)              # before any data is loaded
    if cfg.fsdp and cfg.ema_decay > 0:
        raise PixformerError("--ema-decay keeps a full copy of the weights on every rank; it cannot be combined "
                             "with --fsdp")


# ---- pieces of the loop --------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor`; a pure function of the step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(t, 1.0)))


DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups. Weight decay by role: on the weights of linear and convolution layers only; none
    on biases, norms, position tables, class and mask tokens, whatever their shape. Layer-wise lr
    decay by depth: with L blocks (found by type), a parameter of block i (0-based) gets
    lr_scale = layer_decay^(L - i), one registered before the blocks (embeddings) layer_decay^(L + 1),
    one after them (final norm, head) 1. Frozen parameters are left out."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED)}
    blocks = blocks_of(model)
    depth_of = {id(p): i + 1 for i, b in enumerate(blocks) for p in b.parameters()}
    groups: dict[tuple[float, float], list] = {}
    after_blocks = False
    for p in model.parameters():
        layer = depth_of.get(id(p))
        after_blocks = after_blocks or layer is not None
        if not p.requires_grad:
            continue
        layer = layer if layer is not None else (len(blocks) + 1 if after_blocks else 0)
        key = (weight_decay if id(p) in decay else 0.0, layer_decay ** (len(blocks) + 1 - layer))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale}
            for (wd, scale), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))]


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data: ImageSet | NativeSet, batch_size: int, runtime: Runtime,
             amp: torch.dtype | None = None, stop: "StopFlag | None" = None,
             batcher: NativeBatcher | None = None) -> dict[str, float]:
    """The task's metrics over `data` (made inputs as in training, not augmented; images of any sizes
    packed by `batcher`); the same numbers whatever the batch size: what a task draws at random is
    drawn per example (ExampleRandom), and a packed image sees only itself."""
    model.eval()
    device, sums = runtime.device, {}
    for idx in batch_indices(len(data), batch_size, 0, 0, shuffle=False):
        if stop is not None:
            stop.check()
        share = idx.tensor_split(runtime.data_parallel)[runtime.data_rank]   # this process's; sums all-reduced
        counted = len(share) > 0
        if not counted and not runtime.fsdp:
            continue
        idx = share if counted else idx[:1]   # FSDP2 gathers weights in each forward: every rank runs as many
        if batcher is not None:
            x = batcher([data.images[i] for i in idx.tolist()], task.inputs).to(device)
        else:
            x = task.inputs(data.images[idx].to(device))
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            batch = task.eval_sums(model, x, data.labels[idx].to(device), ExampleRandom(idx.tolist()))
        for k, v in batch.items():
            sums[k] = sums.get(k, 0) + (v if counted else 0)
    return task.metrics(runtime.all_reduce(sums))


class _Stop(Exception):
    """A stop asked by SIGTERM or Ctrl-C, raised at the next safe point."""


class StopFlag:
    """SIGTERM and Ctrl-C ask the loop to stop at its next safe point: after a whole optimizer step
    (counted), or between evaluation batches. So a checkpoint never holds a step applied but not
    counted. A second Ctrl-C stops at once (the last checkpoint is kept)."""

    def __init__(self):
        self.asked: str | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.asked is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def check(self):
        if self.asked is not None:
            raise _Stop(self.asked)


def default_run_dir(name: str, data: str) -> Path:
    return Path("runs") / f"{name.replace('/', '')}-{Path(data).name.split('.')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resumable_state(cfg: TrainConfig) -> dict[str, Any] | None:
    """The saved state of the run `cfg` resumes (None when there is none to resume), after checking
    that `cfg` asks for the same computation: every setting outside RUN_ONLY must be the run's own."""
    ckpt = find_checkpoint(cfg.out) if cfg.resume else None
    if ckpt is None:
        return None
    saved = read_state(ckpt)
    if "converted_from" in saved:
        raise PixformerError(f"{cfg.out} holds a converted model, not a stopped run: train from it with --init {cfg.out}")
    changed = changed_settings(saved["train_config"], cfg)
    if changed:
        raise PixformerError(f"cannot resume {cfg.out} with other settings ({'; '.join(changed)}); resume with "
                             f"the run's own settings ({Path(cfg.out) / 'config.json'}) or start a new --out")
    return saved


def _is_test_row(row: dict) -> bool:
    return any(k.startswith("test_") for k in row)


# ---- the loop ------------------------------------------------------------------------------
def train(cfg: TrainConfig, data: Prepared | None = None) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data` for `cfg.task`; returns the final metrics (`val_*`, `test_*`),
    the run folder and the trained model(s). A run with `resume=True` continues from the checkpoint in
    `cfg.out` to the same result as an uninterrupted run: the data order, augmentation and dropout
    are seeded by (seed, step), and a stop is only taken between whole steps."""
    if cfg.resume and not cfg.out:
        raise PixformerError("--resume needs --out, the folder of the run to continue")
    cfg.speed.check()                                                    # bad names before any work
    task_cls, task_cfg = get_task(cfg.task), task_config(cfg.task, cfg.task_args)
    check_model_args(cfg.model, cfg.model_args)
    if task_cls.needs_init and not cfg.init:
        raise PixformerError(f"--task {cfg.task} needs --init RUN, the trained run whose encoder it starts from")
    if cfg.init and find_checkpoint(cfg.init) is None and foreign_format(cfg.init) is None:
        raise PixformerError(f"--init {cfg.init}: not a pixformer run (state.json and model.safetensors), a "
                             "transformers ViT folder (config.json and safetensors) or a timm ViT state dict (.safetensors)")
    saved = _resumable_state(cfg)                                        # before any data is loaded
    check_parallel(cfg)
    runtime = Runtime.create(cfg.device, cfg.seq_parallel, cfg.seq_sharding, cfg.fsdp, cfg.seed, cfg.seq_regather)
    try:
        result = _train(cfg, data, runtime, task_cls, task_cfg, saved)
    except BaseException:
        runtime.close(barrier=False)     # the other ranks may be inside a collective: do not wait for them
        raise
    runtime.close()
    return result


def _train(cfg: TrainConfig, data: Prepared | None, runtime: Runtime, task_cls, task_cfg, saved) -> dict[str, Any]:
    device, amp = runtime.device, autocast_dtype(cfg.precision, runtime.device)
    data = data or prepare_data(cfg)
    splits, facts = data.splits, data.facts
    task = task_cls(task_cfg, facts)
    prep = lambda s: None if s is None else task.prepare(s)            # noqa: E731
    splits = Splits(prep(splits.train), prep(splits.val), prep(splits.test), splits.val_from)

    say = tqdm.write if runtime.is_main else (lambda *a, **k: None)     # one process speaks (above the bar)
    torch.manual_seed(cfg.seed)
    with runtime.building():                     # FSDP2: only rank 0 holds the whole model (the others: meta)
        model = task.build_model(cfg.model, cfg.model_args)
    name = model_name(model)
    batcher = batcher_for(as_json(cfg), model)                         # None for images of one size
    if cfg.init and saved is None and runtime.holds_weights:            # a resumed run has its own weights
        got = init_from(model, cfg.init)
        say(f"init from {cfg.init} ({got['format']}): loaded {len(got['loaded'])} tensors; new: "
              f"{summarize_keys(got['new'])}; not used: {summarize_keys(got['unused'])}"
              + (f"; converted: {', '.join(got['converted'])}" if got["converted"] else ""))
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(name, cfg.data)
    set_attention_backend(model, cfg.speed.attn_backend)             # before the copy: EMA evaluates with it too
    if not runtime.fsdp:
        model.to(device)                         # (FSDP2 moves each block's shard there when it shards it)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    speed = asdict(cfg.speed)
    if speed["onednn_linear"] is None:
        speed["onednn_linear"] = device.type == "cpu" and onednn_pays()
    if speed["selective_checkpoint"] is None:
        speed["selective_checkpoint"] = selective_pays(cfg.model, facts.img_size, cfg.batch_size,
                                                       "bf16" if amp else "fp32", cfg.speed.attn_backend,
                                                       len(facts.classes), facts.in_chans, **cfg.model_args,
                                                       seq_parallel=runtime.seq_parallel,      # per rank
                                                       data_parallel=runtime.data_parallel)
    apply_speed_settings(model, **speed)                                 # from outside the model
    part = runtime.part(cfg.batch_size)                                  # this process's rows of each batch

    steps_per_epoch = max(len(splits.train) // cfg.batch_size, 1)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    metric, better = task.best
    state = {"train_config": as_json(cfg), "task": {"name": task.name, "config": asdict(task_cfg)},
             "model": model_spec(model), "model_name": name, "step": 0, "epochs_logged": 0,
             "data": {**asdict(facts), "source": source_id(cfg.data), "val_from": splits.val_from,
                      "val_fraction": cfg.val_fraction, "has_test": splits.test is not None},
             f"best_{metric}": None, "test": None, "weights": "ema" if ema is not None else "model",
             "speed": {**speed, "precision": str(amp or torch.float32)[6:]}}  # as resolved for this run
    running: dict[str, float] = {}       # this epoch's training statistics so far (sums), and "_seconds"

    step, metrics_path = 0, run_dir / "metrics.jsonl"
    ckpt = find_checkpoint(run_dir)
    if saved is not None:
        spec = json.loads(json.dumps(state["model"]))  # as stored: JSON turns tuples (img_size) into lists
        if saved["model"] != spec:
            diff = sorted(k for k in set(saved["model"]["config"]) | set(spec["config"])
                          if saved["model"]["config"].get(k) != spec["config"].get(k))
            raise PixformerError(f"cannot resume {run_dir}: its checkpoint is a different model (differs in {diff})")
        if runtime.holds_weights:                # FSDP2: rank 0 loads, wrap hands each rank its shard
            load_weights(model, ckpt / "model.safetensors")
        if ema is not None:
            load_weights(ema, ckpt / "ema.safetensors")
        for k in ("step", "epochs_logged", f"best_{metric}", "test"):
            state[k] = saved[k]
        step, running = saved["step"], saved["running"]
        if metrics_path.exists():  # forget rows logged after the checkpoint; they are computed again
            rows = [json.loads(l) for l in metrics_path.read_text().splitlines()]
            keep = [r for r in rows if (state["test"] is not None if _is_test_row(r) else r["epoch"] <= state["epochs_logged"])]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        say(f"resuming {run_dir} at step {step}/{total_steps}")
    elif cfg.resume:
        say(f"no checkpoint in {run_dir}; starting from scratch")
    elif ckpt is not None:
        raise PixformerError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    step_model = runtime.wrap(model)            # DDP, FSDP2 (shards `model` in place) or sequence-parallel
    eval_forward = runtime.wrap(ema or model, train=False)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                            foreach=True)   # torch's CPU default updates the tensors one by one
    if saved is not None:
        optimizer_from_files(opt, load_tensors(ckpt / "optimizer.safetensors"), saved["optimizer"])
    tb = None
    if runtime.is_main:                  # only the main process writes checkpoints and logs
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(state["train_config"], indent=1))
        tb = _tensorboard(run_dir)

    def checkpoint():
        weights, opt_state = runtime.full_state(model, opt)             # FSDP2: gathered on every rank
        if runtime.is_main:
            save_checkpoint(run_dir, {**state, "step": step, "running": running}, weights, opt_state, ema)

    def log(record: dict):
        if not runtime.is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    tb.add_scalar(k, v, record["step"])

    ema_pairs = list(zip(ema.state_dict().values(), model.state_dict().values())) if ema is not None else []
    ema_float = [[e for e, _ in ema_pairs if e.is_floating_point()], [m for e, m in ema_pairs if e.is_floating_point()]]
    ema_other = [(e, m) for e, m in ema_pairs if not e.is_floating_point()]   # e.g. BatchNorm's batch count
    eval_model = ema or model
    val, lr = None, lr_at(max(step - 1, 0), total_steps, warmup, cfg.lr, cfg.min_lr)   # of the last step taken
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and runtime.is_main), dynamic_ncols=True,
               desc=f"{name} {Path(cfg.data).name}")
    try:
        with StopFlag() as stop:
            while True:
                epochs_done = step // steps_per_epoch
                if state["epochs_logged"] < epochs_done:     # an epoch ended; validate it (again, after a stop)
                    val = evaluate(task, eval_forward, splits.val, cfg.eval_batch_size, runtime, amp, stop, batcher)
                    best = state[f"best_{metric}"]
                    if best is None or (val[metric] > best if better == "max" else val[metric] < best):
                        state[f"best_{metric}"] = val[metric]
                    n = max(running.get("n", 0), 1)
                    record = {"step": step, "epoch": epochs_done, "lr": lr,
                              **{f"train_{k}": v / n for k, v in running.items() if not k.startswith("_") and k != "n"},
                              "img_per_s": running.get("n", 0) / max(running.get("_seconds", 0), 1e-9),
                              **({"train_padding": 1 - running["_useful"] / running["_slots"]} if "_slots" in running else {}),
                              **{f"val_{k}": v for k, v in val.items() if k != "n"}}
                    log(record)
                    say(f"{name} epoch {epochs_done}/{cfg.epochs}  train loss {record.get('train_loss', 0):.4f}  "
                              + "  ".join(f"val {k} {v:.4f}" for k, v in val.items() if k != "n"))
                    if runtime.is_main or runtime.fsdp:   # FSDP2: every rank runs the figures' forwards
                        task.report(eval_model, splits.val, run_dir if runtime.is_main else None, epochs_done)
                    state["epochs_logged"] = epochs_done
                    checkpoint()
                if step >= total_steps:
                    break
                if step % steps_per_epoch == 0:
                    running = {}
                model.train()
                epoch = step // steps_per_epoch
                for idx in batch_indices(len(splits.train), cfg.batch_size, epoch, cfg.seed)[step % steps_per_epoch:]:
                    t0 = time.perf_counter()
                    torch.manual_seed(cfg.seed * 1_000_003 + step)          # dropout / drop-path, per step
                    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                    rng = np.random.default_rng([cfg.seed, step])
                    # the global batch is drawn and augmented as one process would, then this rank's rows kept
                    if batcher is not None:                                 # images of any sizes, packed
                        images = [splits.train.images[i] for i in idx.tolist()]
                        flips = torch.rand(len(images), generator=g) < 0.5 if cfg.hflip else [False] * len(images)
                        images = [im.flip(-1) if f else im for im, f in zip(images, flips)]
                        x = batcher(images, task.inputs, g, train=True, part=part).to(device)
                    else:
                        images = splits.train.images[idx].to(device, non_blocking=True)   # uint8 (B, C, H, W)
                        images = random_crop(images, cfg.crop_padding, g)
                        images = random_flip(images, g) if cfg.hflip else images
                        x = task.inputs(images[part])
                    y = splits.train.labels[idx][part].to(device)
                    if runtime.world_size > 1:
                        rng = RankRandom(rng, part, len(idx))

                    lr = lr_at(step, total_steps, warmup, cfg.lr, cfg.min_lr)
                    for group in opt.param_groups:
                        group["lr"] = lr * group["lr_scale"]
                    with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        loss, stats = task.loss(step_model, x, y, rng)
                    if not torch.isfinite(loss):
                        raise PixformerError(f"loss became {loss.item()} at step {step}; lower --lr or use --precision fp32")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    runtime.sync_gradients(model)                          # sequence parallel: LSS's averaging
                    if cfg.clip_grad > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    opt.step()
                    if ema is not None:
                        with torch.no_grad():
                            torch._foreach_lerp_(*ema_float, 1 - cfg.ema_decay)
                            for e, m in ema_other:
                                e.copy_(m)
                    step += 1
                    if batcher is not None:                               # packed slots, and those holding tokens
                        stats = {**stats, "_useful": x.useful, "_slots": x.segments.numel()}
                    stats = runtime.all_reduce(stats)                     # the global batch's statistics

                    for k, v in stats.items():
                        running[k] = running.get(k, 0) + v
                    running["_seconds"] = running.get("_seconds", 0.0) + time.perf_counter() - t0
                    n = max(running.get("n", 0), 1)
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, **{k: f"{v / n:.3f}" for k, v in running.items() if not k.startswith("_") and k != "n"},
                                    img_s=f"{running.get('n', 0) / running['_seconds']:.0f}", lr=f"{lr:.1e}")
                    stop.check()
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                        checkpoint()
            if splits.test is not None and state["test"] is None:  # once, at the end
                state["test"] = evaluate(task, eval_forward, splits.test, cfg.eval_batch_size, runtime, amp, stop, batcher)
                log({"step": step, "epoch": cfg.epochs, **{f"test_{k}": v for k, v in state["test"].items() if k != "n"}})
                checkpoint()
    except _Stop as why:
        bar.close()
        checkpoint()
        raise PixformerError(f"stopped ({why}) at step {step}/{total_steps}; checkpoint saved. Continue with: "
                             f"pixformer train --out {run_dir} --resume (and the same settings)") from None
    except KeyboardInterrupt:
        raise PixformerError(f"stopped at once at step {step}/{total_steps}; the last checkpoint in {run_dir} "
                             "is kept (continue with --resume)") from None
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    if val is None:  # resumed a run whose last epoch was validated before
        val = evaluate(task, eval_forward, splits.val, cfg.eval_batch_size, runtime, amp, batcher=batcher)
    return {"run_dir": str(run_dir), "model_name": name, "step": step, f"best_{metric}": state[f"best_{metric}"],
            **{f"val_{k}": v for k, v in val.items()},
            **{f"test_{k}": v for k, v in (state["test"] or {}).items()}, "model": model, "ema": ema}


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))
