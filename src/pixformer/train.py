"""Supervised training: one plain loop you can read in one sitting.

    from pixformer.train import TrainConfig, train
    result = train(TrainConfig(model="pit-n", data="digits", epochs=30, out="runs/pit"))
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .ablations import apply_permutation, pixel_permutation
from .attention import set_attention_backend
from .perf import apply_speed_settings, autocast_dtype, check_speed_settings
from .plan import selective_pays
from .checkpoint import find_checkpoint, load_tensors, load_weights, optimizer_from_files, read_state, save_checkpoint
from .data import (ImageSet, batch_indices, channel_stats, holdout, load_source, mix, normalize, random_crop,
                   random_flip)
from .errors import PixformerError
from .registry import create_model, model_spec


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = "vit-n/2"              # a name from `pixformer models`
    data: str = "digits"                # digits | cifar10 | cifar100 | mnist | fashion-mnist | ImageFolder path
    data_root: str | None = None        # where named datasets live / download to (default ~/.cache/pixformer/data)
    img_size: int | None = None         # resize images to img_size x img_size (default: native size)
    out: str | None = None              # run folder (default runs/<model>-<data>-<time>)
    # model settings that override the named model's (None keeps the model's own)
    depth: int | None = None
    dim: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    pool: str | None = None             # cls | mean
    pos_embed: str | None = None        # learned | sincos2d | none
    drop_path: float | None = None
    patch_size: int | None = None       # e.g. convmixer-256/8 --patch-size 1
    kernel_size: int | None = None      # ConvMixer's depthwise kernel
    attn_backend: str = "auto"          # auto | sdpa | blocked | math | flash | efficient | cudnn (attention.py)
    # speed and memory (see perf.py; `pixformer plan` estimates the memory)
    checkpoint_blocks: int | str = 0    # full activation checkpointing of the first N blocks, or "all"
    selective_checkpoint: bool | None = None  # other blocks recompute norms / GELU in backward: -30% activation
    #                                     memory; unset: on when the step's activations exceed 1 GiB
    compile: bool = False               # torch.compile each block (the first steps compile)
    onednn_linear: bool = True          # fp32 linear layers on CPU through oneDNN (faster than MKL on AMD)
    allocator: str = "auto"             # auto | keep | release | system: glibc malloc policy (perf.set_allocator)
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3                    # peak learning rate (AdamW)
    min_lr: float = 1e-5                # end of the cosine
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float = 1.0              # max gradient norm; 0 = off
    ema_decay: float = 0.0              # weight EMA per step; 0 = off (e.g. 0.999)
    # augmentation (batch ops)
    crop_padding: int = 0               # random crop with this zero padding; 0 = off
    hflip: bool = False                 # random horizontal flip
    mixup: float = 0.0                  # mixup Beta alpha; 0 = off
    cutmix: float = 0.0                 # CutMix Beta alpha; 0 = off
    # data handling
    val_fraction: float = 0.1           # held out of train when the data has no test split
    train_subset: int | None = None     # train on a seeded random subset of this many images
    skip_bad_images: bool = False       # count and skip unreadable images instead of stopping
    # locality ablations: one fixed pixel permutation of every image, train and val (see ablations.py)
    permute_pixels: bool = False        # shuffle all pixel positions
    local_swaps: int = 0                # the PiT paper's T: swaps of pixel pairs ...
    swap_distance: int | None = None    # ... at most δ apart (Chebyshev); unset = anywhere
    permute_seed: int = 0               # draws the permutation
    # run control
    seed: int = 0
    precision: str = "auto"             # auto (bf16 where native: GPUs, AMX / AVX512-BF16 CPUs) | fp32 | bf16
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 512
    checkpoint_every: int = 0           # also checkpoint every N steps (0: at the end of each epoch only)
    resume: bool = False                # continue the run in `out` from its checkpoint
    progress: bool = True               # show the tqdm bar


# ---- data ----------------------------------------------------------------------------------
@dataclass
class Prepared:
    train: ImageSet
    val: ImageSet
    val_split: str          # "test" (the dataset's own) or "val" (held out of train)
    mean: list[float]
    std: list[float]


def prepare_data(cfg: TrainConfig) -> Prepared:
    """Load the source; validate on its test split, or on a seeded hold-out of train when it has none."""
    size = (cfg.img_size, cfg.img_size) if cfg.img_size else None
    splits = load_source(cfg.data, cfg.data_root, size, cfg.skip_bad_images)
    train = splits.get("train", splits.get("all"))
    if "test" in splits and "train" in splits:
        val, val_split = splits["test"], "test"
    else:
        tr, va = holdout(len(train), cfg.val_fraction, seed=0)
        train, val, val_split = train.subset(tr), train.subset(va), "val"
    if cfg.train_subset:
        if cfg.train_subset > len(train):
            raise PixformerError(f"--train-subset {cfg.train_subset} exceeds the {len(train)} training images")
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_subset]
        train = train.subset(idx.sort().values)
    perm = pixel_permutation(cfg, *train.images.shape[-2:])              # None unless an ablation is on
    train = ImageSet(apply_permutation(train.images, perm), train.labels, train.classes)
    val = ImageSet(apply_permutation(val.images, perm), val.labels, val.classes)
    mean, std = channel_stats(train.images)
    return Prepared(train, val, val_split, mean, std)


# ---- pieces of the loop --------------------------------------------------------------------
# TrainConfig fields that perf.apply_speed_settings applies to the model
SPEED_SETTINGS = ("attn_backend", "checkpoint_blocks", "selective_checkpoint", "onednn_linear", "compile", "allocator")
# TrainConfig fields that override the named model's own settings (None keeps the model's)
MODEL_SETTINGS = ("depth", "dim", "heads", "mlp_ratio", "pool", "pos_embed", "drop_path", "patch_size", "kernel_size")


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in MODEL_SETTINGS}


def build_model(cfg: TrainConfig, img_size: tuple[int, int], num_classes: int, in_chans: int) -> nn.Module:
    """The model a run trains: `cfg.model` for this data, with the run's model settings applied."""
    return create_model(cfg.model, img_size=img_size, num_classes=num_classes, in_chans=in_chans,
                        **model_overrides(cfg))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PixformerError(f"device {name!r} asked for, but no CUDA device is available")
    return torch.device(name)


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor`; a pure function of the step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; none on biases, norms, position tables and the class token."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and p.ndim != 3]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, mean, std, batch_size: int = 512, device="cpu",
             amp: torch.dtype | None = None, class_map: torch.Tensor | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy over `data`.
    `class_map` maps the data's label indices to the model's class indices."""
    model.eval()
    n, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for idx in batch_indices(len(data), batch_size, 0, 0, shuffle=False):
        x = normalize(data.images[idx].to(device), mean, std)
        y = data.labels[idx].to(device)
        if class_map is not None:
            y = class_map.to(device)[y]
        with torch.autocast(device_type=torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (top[:, 0] == y).sum().item()
        top5 += (top == y[:, None]).any(dim=1).sum().item()
        n += len(y)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss_sum / n, "n": n}


class _Stop(Exception):
    """Raised from the SIGTERM handler so a killed run checkpoints where it stands."""


def _raise_stop(signum, frame):
    raise _Stop()


def default_run_dir(cfg: TrainConfig) -> Path:
    name = f"{cfg.model.replace('/', '')}-{Path(cfg.data).name.split('.')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / name


# ---- the loop ------------------------------------------------------------------------------
def train(cfg: TrainConfig, data: Prepared | None = None) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`; returns the final metrics and the run folder.
    A run with `resume=True` continues from the checkpoint in `cfg.out` to the same result as an
    uninterrupted run: the data order, augmentation and dropout are seeded by (seed, step)."""
    if cfg.resume and not cfg.out:
        raise PixformerError("--resume needs --out, the folder of the run to continue")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    device = pick_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    check_speed_settings(cfg.attn_backend, cfg.allocator)
    data = data or prepare_data(cfg)
    train_set, val_set = data.train, data.val
    classes = train_set.classes
    in_chans, img_hw = train_set.images.shape[1], tuple(train_set.images.shape[-2:])

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, img_hw, len(classes), in_chans)
    set_attention_backend(model, cfg.attn_backend).to(device)   # before the copy: EMA evaluates with it too
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    speed = {k: getattr(cfg, k) for k in SPEED_SETTINGS}
    if speed["selective_checkpoint"] is None:
        speed["selective_checkpoint"] = selective_pays(cfg.model, img_hw, cfg.batch_size, "bf16" if amp else "fp32",
                                                       cfg.attn_backend, len(classes), in_chans, **model_overrides(cfg))
    apply_speed_settings(model, **speed)                                 # from outside the model
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))

    steps_per_epoch = max(len(train_set) // cfg.batch_size, 1)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    state = {"train_config": dataclasses.asdict(cfg), "model": model_spec(model), "step": 0,
             "data": {"classes": classes, "mean": data.mean, "std": data.std, "img_size": list(img_hw),
                      "in_chans": in_chans, "val_split": data.val_split, "val_fraction": cfg.val_fraction},
             "best_top1": 0.0, "weights": "ema" if ema is not None else "model",
             "speed": {**speed, "precision": str(amp or torch.float32)[6:]}}  # as resolved for this run

    step, resumed_running = 0, None
    metrics_path = run_dir / "metrics.jsonl"
    ckpt = find_checkpoint(run_dir)
    if cfg.resume and ckpt is not None:
        saved = read_state(ckpt)
        spec = json.loads(json.dumps(state["model"]))  # as stored: JSON turns tuples (img_size) into lists
        if saved["model"] != spec:
            diff = sorted(k for k in set(saved["model"]["config"]) | set(spec["config"])
                          if saved["model"]["config"].get(k) != spec["config"].get(k))
            raise PixformerError(f"cannot resume {run_dir}: its checkpoint is a different model (differs in {diff})")
        load_weights(model, ckpt / "model.safetensors")
        if ema is not None:
            load_weights(ema, ckpt / "ema.safetensors")
        optimizer_from_files(opt, load_tensors(ckpt / "optimizer.safetensors"), saved["optimizer"])
        step, state["best_top1"] = saved["step"], saved["best_top1"]
        resumed_running = saved.get("running") if step % steps_per_epoch else None
        if metrics_path.exists():  # forget what was logged after the checkpoint; it is recomputed
            keep = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= step]
            metrics_path.write_text("".join(l + "\n" for l in keep))
        print(f"resuming {run_dir} at step {step}/{total_steps}")
    elif cfg.resume:
        print(f"no checkpoint in {run_dir}; starting from scratch")
    elif ckpt is not None:
        raise PixformerError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(state["train_config"], indent=1))
    tb = _tensorboard(run_dir)

    running = {"seen": 0, "correct": 0, "loss_sum": 0.0}  # this epoch's training statistics so far

    def checkpoint():
        save_checkpoint(run_dir, {**state, "step": step, "running": running}, model, opt, ema)

    def log(record: dict):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    tb.add_scalar(k, v, record["step"])

    val_metrics = None
    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, dynamic_ncols=True,
               desc=f"{cfg.model} {Path(cfg.data).name}")
    old_handler = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            batches = batch_indices(len(train_set), cfg.batch_size, epoch, cfg.seed)[step % steps_per_epoch:]
            model.train()
            running = resumed_running or {"seen": 0, "correct": 0, "loss_sum": 0.0}
            resumed_running, t0, t0_seen = None, time.time(), running["seen"]
            for idx in batches:
                torch.manual_seed(cfg.seed * 1_000_003 + step)          # dropout / drop-path, per step
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                rng = np.random.default_rng([cfg.seed, step])
                x = normalize(train_set.images[idx].to(device, non_blocking=True), data.mean, data.std)
                y = train_set.labels[idx].to(device)
                x = random_crop(x, cfg.crop_padding, g)
                x = random_flip(x, g) if cfg.hflip else x
                target = F.one_hot(y, len(classes)).float()
                target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / len(classes)
                x, target = mix(x, target, cfg.mixup, cfg.cutmix, rng)

                lr = lr_at(step, total_steps, warmup, cfg.lr, cfg.min_lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    logits = model(x).float()
                loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
                if not torch.isfinite(loss):
                    raise PixformerError(f"loss became {loss.item()} at step {step}; lower --lr or use --precision fp32")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                if ema is not None:
                    with torch.no_grad():
                        for pe, pm in zip(ema.state_dict().values(), model.state_dict().values()):
                            pe.lerp_(pm, 1 - cfg.ema_decay) if pe.is_floating_point() else pe.copy_(pm)
                step += 1

                running["seen"] += len(y)
                running["loss_sum"] += loss.item() * len(y)
                running["correct"] += (logits.argmax(1) == y).sum().item()
                seen = running["seen"]
                img_s = (seen - t0_seen) / (time.time() - t0)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running['loss_sum'] / seen:.3f}",
                                acc=f"{running['correct'] / seen:.3f}", img_s=f"{img_s:.0f}", lr=f"{lr:.1e}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                    checkpoint()

            val_metrics = evaluate(ema or model, val_set, data.mean, data.std, cfg.eval_batch_size, device, amp)
            state["best_top1"] = max(state["best_top1"], val_metrics["top1"])
            seen = max(running["seen"], 1)
            record = {"step": step, "epoch": epoch + 1, "lr": lr, "train_loss": running["loss_sum"] / seen,
                      "train_acc": running["correct"] / seen, "img_per_s": img_s,
                      **{f"{data.val_split}_{k}": v for k, v in val_metrics.items() if k != "n"}}
            log(record)
            bar.write(f"epoch {epoch + 1}/{cfg.epochs}  train loss {record['train_loss']:.4f}  "
                      f"{data.val_split} top1 {val_metrics['top1']:.4f}  top5 {val_metrics['top5']:.4f}")
            checkpoint()
    except (KeyboardInterrupt, _Stop):
        bar.close()
        checkpoint()
        raise PixformerError(f"interrupted at step {step}/{total_steps}; checkpoint saved. Continue with: "
                             f"pixformer train --out {run_dir} --resume true (and the same settings)") from None
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        bar.close()
        if tb is not None:
            tb.close()
    if val_metrics is None:  # resumed a finished run
        val_metrics = evaluate(ema or model, val_set, data.mean, data.std, cfg.eval_batch_size, device, amp)
    return {"run_dir": str(run_dir), "step": step, "val_split": data.val_split, **val_metrics,
            "model": model, "ema": ema}


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))
