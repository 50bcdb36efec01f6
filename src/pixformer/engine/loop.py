"""The training loop every task shares, in small named functions you can read in one sitting.

    import pixformer
    result = pixformer.train(pixformer.TrainConfig(model="pit-n", data="digits", epochs=30, out="runs/pit"))

    train  checks the settings, joins the runtime        start  data, task, model; attach: folder, optimizer, resume
    fit    the loop: epochs end, steps run, stops taken   step   one optimizer step on one batch
    end_of_epoch  validate, log, figures, checkpoint      checkpoint / log   the run folder's files

The loop owns the optimizer and its learning rate per step (engine/optim.py: AdamW, LAMB or Muon, their
parameter groups, warm-up then cosine, linear or one-cycle decay), precision, the speed switches, EMA,
gradient clipping, checkpoints and exact resume, SIGTERM / Ctrl-C, metrics.jsonl and TensorBoard,
the progress bar and the validation cadence. Batches come from one place, a `Prefetcher` that makes
the next ones on background threads while the step runs (data/loader.py); each is a pure function of
the run's seed and its step, so prefetching changes when a batch is made, not what it holds. The task
(pixformer.tasks) owns the model it trains, the loss of a batch and its evaluation metrics.
Validation uses the val split (never test); the test split, where the data has one, is evaluated once
at the end and reported apart (`test_*`).

Under torchrun the ranks decide together: a stop asked (SIGTERM, Ctrl-C) and a non-finite loss ride
in the step's one all-reduce of statistics, so every rank stops after the same step; a rank whose
peer died gets one line, not a collective's traceback.
"""
from __future__ import annotations

import copy
import json
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..data.ablations import permuted
from ..data.augment import batch_indices, rand_augment, random_crop, random_erase, random_flip, trivial_augment
from ..data.loader import Prefetcher
from ..data.native import NativeBatcher, batcher_for, check_native_size, table_side
from ..data.sources import load_source
from ..data.store import ImageSet, NativeSet, pick
from ..data.splits import Splits, channel_stats, resolve_splits, source_id
from ..errors import PixformerError, install_hint
from ..files import write_atomically
from ..layout import Packed, check_grid
from ..models import token_layout
from ..models.attention import check_sequence_backend, set_attention_backend
from ..models.registry import check_model_args, model_name, model_spec, resolve, setting
from ..progress import Progress
from ..tasks import TASKS, DataFacts, Task, get_task, task_config
from ..tasks.base import ExampleRandom
from .checkpoint import (check_holds_no_other_files, check_out_folder, find_checkpoint, init_from, load_tensors,
                         load_weights, optimizer_state, read_state, save_checkpoint, summarize_keys)
from .config import TrainConfig, as_json, changed_settings
from .imports import foreign_format
from .launch import LAUNCHER_ENV
from .optim import Optimizers, build_optimizer, lr_at
from .perf import apply_speed_settings, autocast_dtype, checkpoint_count, onednn_pays
from .plan import blocks_peak_bytes, device_memory, format_bytes, plan, regather_count, selective_above, selective_pays
from .progressive import check_progressive, resized, side_at
from .rundir import RunFolder, append_metrics, claim, trim_metrics
from .runtime import RankRandom, Runtime, lost_peer, out_of_memory

TIMING_KEYS = ("img_per_s", "data_wait")    # metrics that measure the machine, not the run


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
    found = load_source(cfg.data, cfg.data_root, size, cfg.skip_bad_images, native=cfg.native, max_side=cfg.max_side,
                        workers=cfg.workers, image_column=cfg.image_column, label_column=cfg.label_column,
                        min_classes=get_task(cfg.task).min_classes)
    s = resolve_splits(found, cfg.val_fraction, cfg.data)
    train = s.train
    if cfg.train_subset:
        if cfg.train_subset > len(train):
            raise PixformerError(f"--train-subset {cfg.train_subset} exceeds the {len(train)} training images")
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_subset]
        train = train.subset(idx.sort().values)
    if cfg.native:
        side = table_side(cfg.max_side, cfg.max_tokens, native_patch(cfg, get_task(cfg.task)))
        mean, std = channel_stats(stats_sample(train.images))
        return Prepared(Splits(train, s.val, s.test, s.val_from), DataFacts(train.classes, train.in_chans, (side, side), mean, std))
    s = Splits(permuted(train, cfg), permuted(s.val, cfg), None if s.test is None else permuted(s.test, cfg), s.val_from)
    mean, std = channel_stats(stats_sample(s.train.images))
    facts = DataFacts(s.train.classes, s.train.images.shape[1], tuple(s.train.images.shape[-2:]), mean, std)
    return Prepared(s, facts)


def stats_sample(images):
    """The images the normalisation is computed on: all of them, or for a source that decodes each image
    when it is read (a Hugging Face dataset) a seeded sample of at most 10,000."""
    return images.subset(images.sample_indices()) if getattr(images, "decodes_on_the_fly", False) else images


def native_patch(cfg: TrainConfig, task_cls: type[Task]) -> int:
    """The patch size of a native-resolution run's model, or a clear error for what cannot run there."""
    arch, _ = resolve(cfg.model)
    if arch not in task_cls.packs:
        raise PixformerError(f"native resolution (--max-side / --max-tokens) packs images of any sizes; --task "
                             f"{cfg.task} cannot train {cfg.model} on them" + _which("those that can", "packs"))
    check_native_size(True, cfg.img_size)
    if cfg.crop_padding:
        raise PixformerError("--crop-padding pads square images; at native resolution use --resolution-range instead")
    if cfg.permute_pixels or cfg.local_swaps:
        raise PixformerError("pixel permutations (--permute-pixels, --local-swaps) need images of one size")
    task_cls.check_native(task_config(cfg.task, cfg.task_args))
    if cfg.rand_augment or cfg.trivial_augment or cfg.random_erase or cfg.repeat_aug > 1:
        raise PixformerError("--rand-augment, --trivial-augment, --random-erase and --repeat-aug augment square "
                             "batches of one size; turn them off at native resolution")
    return int(setting(cfg.model, cfg.model_args, "patch_size"))


def _which(what: str, capability: str) -> str:
    """' (what: --task T with A models; ...)': the tasks that have a capability, for an error message."""
    have = [f"--task {t.name} with {' / '.join(getattr(t, capability))} models" for t in TASKS.values()
            if getattr(t, capability)]
    return f" ({what}: {'; '.join(have)})" if have else ""


def _tasks_for(arch: str) -> str:
    """' (use --task T or U)': the tasks that train models of `arch`, for an error message."""
    names = [t.name for t in TASKS.values() if arch in t.architectures]
    return f" (use --task {' or '.join(names)})" if names else ""


def check_run(cfg: TrainConfig, task_cls: type[Task], resuming: bool = False) -> None:
    """A clear error, before any data is loaded, for an architecture the task does not train and for
    what sequence parallelism, FSDP2, progressive resizing, resolution sampling and a task trained on an
    encoding of the images (pixel augmentations) cannot run."""
    check_progressive(cfg)
    arch, _ = resolve(cfg.model)
    if task_cls.architectures and arch not in task_cls.architectures:
        raise PixformerError(f"--task {cfg.task} trains {' / '.join(task_cls.architectures)} models; {cfg.model} is "
                             f"a {arch} model" + _tasks_for(arch))
    if cfg.native:
        native_patch(cfg, task_cls)                  # what native resolution cannot run, before any data
    lo_hi = cfg.resolution_range
    if lo_hi is not None and cfg.max_side and lo_hi[1] > cfg.max_side and not resuming:   # (a run saved so resumes)
        raise PixformerError(f"--resolution-range {lo_hi[0]} {lo_hi[1]} draws longer sides above --max-side "
                             f"{cfg.max_side}, which would all be scaled down to {cfg.max_side}: use a HI of at "
                             f"most {cfg.max_side}, or a larger --max-side")
    if cfg.seq_parallel > 1:
        if cfg.native:
            raise PixformerError("--seq-parallel splits each square image's tokens over ranks; images packed at "
                                 "native resolution (--max-side / --max-tokens) are not split: train them with "
                                 "data parallelism alone")
        if arch not in task_cls.splits_tokens:
            raise PixformerError(f"--seq-parallel splits each square image's tokens over ranks; --task {cfg.task} "
                                 f"cannot do that with {cfg.model}" + _which("it can", "splits_tokens"))
        check_sequence_backend(cfg.speed.attn_backend)
        regather_count(cfg.seq_regather, setting(cfg.model, cfg.model_args, "depth"))
    if cfg.model_args.get("stem") == "conv" and (cfg.native or cfg.seq_parallel > 1 or task_cls.embeds_subsets):
        raise PixformerError("--stem conv embeds whole images of one size; packed images (--max-side / --max-tokens), "
                             "sequence shards (--seq-parallel) and MAE's visible patches need --stem linear")
    if cfg.fsdp and cfg.ema_decay > 0:
        raise PixformerError("--ema-decay keeps a full copy of the weights on every rank; it cannot be combined "
                             "with --fsdp")
    encoded = task_cls.encoded(task_config(cfg.task, cfg.task_args))
    if cfg.img_size and not cfg.native and encoded is None:         # the patch tiles the images (before decoding them)
        check_grid((cfg.img_size, cfg.img_size), setting(cfg.model, cfg.model_args, "patch_size"))
    pixel_ops = [name for name, on in (("--crop-padding", cfg.crop_padding), ("--rand-augment", cfg.rand_augment),
                                       ("--trivial-augment", cfg.trivial_augment), ("--random-erase", cfg.random_erase))
                 if on]
    why = encoded if pixel_ops else None
    if why:
        raise PixformerError(f"{' and '.join(pixel_ops)} change{'s' if len(pixel_ops) == 1 else ''} the images' pixels, "
                             f"but {why}: leave {'it' if len(pixel_ops) == 1 else 'them'} off (--hflip flips the latents)")


def check_one_image_fits(cfg: TrainConfig, task_cls: type[Task], runtime: Runtime) -> None:
    """A one-line error when not even one image of --img-size would fit the device's memory with every
    block checkpointed, as the planner counts a ViT whose blocks see every token (the tasks it models;
    others, and images of their own sizes, are left to the run)."""
    arch, _ = resolve(cfg.model)
    memory = device_memory(runtime.device)
    if not cfg.img_size or cfg.native or arch != "vit" or task_cls.embeds_subsets or memory is None:
        return
    amp = autocast_dtype(cfg.precision, runtime.device)
    p = plan(cfg.model, cfg.img_size, precision="bf16" if amp else "fp32", attn_backend=cfg.speed.attn_backend,
             seq_parallel=runtime.seq_parallel, data_parallel=runtime.data_parallel, fsdp=cfg.fsdp,
             lean_mlp=cfg.speed.lean_mlp_on, lean_norms=cfg.speed.lean_norms_on, **cfg.model_args)
    need = p.peak_bytes(runtime.data_parallel, "full")                  # one image a rank
    if need > memory:
        where = "this machine's memory" if runtime.device.type == "cpu" else f"{runtime.device}'s memory"
        raise PixformerError(f"--img-size {cfg.img_size}: one image of {cfg.model} needs about {format_bytes(need)} to "
                             f"train even with every block checkpointed, more than {where} ({format_bytes(memory)}); "
                             f"train smaller images (`pixformer plan --model {cfg.model} --img-size N` counts them)")


# ---- pieces of the loop --------------------------------------------------------------------
class _Stop(Exception):
    """A stop asked by SIGTERM or Ctrl-C, raised at the next safe point."""


class Stopped(PixformerError):
    """A run stopped on request (SIGTERM, Ctrl-C), its checkpoint kept: no error. Its message ends
    with the command that continues the run; `exit_code`, which `pixformer train` exits with, is the
    shell's for the signal: 130 for Ctrl-C, 143 for SIGTERM (and for a stop another process of the
    run was asked)."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.exit_code = 130 if why == "SIGINT" else 143


def continue_command(run: "Run") -> str:
    """The command that continues a stopped run: its folder and --resume (the run's own settings)."""
    import os
    import shlex
    resume = f"train --out {shlex.quote(str(run.run_dir))} --resume"
    if run.runtime.world_size == 1:
        return f"pixformer {resume}"
    launcher = os.environ.get(LAUNCHER_ENV)                              # set by pixformer launch
    return f"{launcher} {resume}" if launcher else f"pixformer {resume} (launched by torchrun as before)"


class StopFlag:
    """SIGTERM and Ctrl-C ask the loop to stop at its next safe point: after a whole optimizer step
    (counted) that every rank agreed to stop at, or, in one process, between evaluation batches. So a
    checkpoint never holds a step applied but not counted. A second Ctrl-C stops at once (the last
    checkpoint is kept)."""

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


def default_run_dir(*parts: str, data: str | None = None) -> Path:
    """A new run folder's default: runs/<parts>-<the data's short name>-<date>-<time> (a model name's / dropped)."""
    names = [p.replace("/", "") for p in parts] + ([Path(data).name.split(".")[0]] if data else [])
    return Path("runs") / "-".join([*names, time.strftime("%Y%m%d-%H%M%S")])


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
        longer = " (to train on from its weights: a new --out with --init " + str(cfg.out) + ")" \
            if any(c.startswith("epochs:") for c in changed) else ""
        raise PixformerError(f"cannot resume {cfg.out} with other settings ({'; '.join(changed)}): drop those "
                             f"options (`pixformer train --out {cfg.out} --resume` takes the run's own; in Python "
                             f"TrainConfig.from_run) or start a new --out{longer}")
    return saved


def _is_test_row(row: dict) -> bool:
    return any(k.startswith("test_") for k in row)


# ---- batches -------------------------------------------------------------------------------
@dataclass
class Batch:
    """One step's inputs on the CPU: uint8 images (B, C, H, W) of this rank's rows, or packed model
    inputs for images of any sizes; the labels of the same rows; the global batch's size."""
    x: Tensor | Packed
    y: Tensor
    size: int

    def to(self, device: torch.device) -> "Batch":
        x = self.x.to(device) if isinstance(self.x, Packed) else self.x.to(device, non_blocking=True)  # (Packed's is)
        return Batch(x, self.y.to(device, non_blocking=True), self.size)


@lru_cache(maxsize=2)
def _epoch_batches(n: int, batch_size: int, epoch: int, seed: int, repeats: int) -> list[Tensor]:
    return batch_indices(n, batch_size, epoch, seed, repeats=repeats)


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s draws (augmentation, packing, dropout): a function of (seed, step) alone."""
    return seed * 1_000_003 + step


def dropout_seed(seed: int, step: int, data_rank: int) -> int:
    """The seed of torch's generator in step `step` (dropout and drop-path masks) on a rank of data-parallel
    rank `data_rank`: its own for each data-parallel rank, which holds its own rows (the same ones would
    drop the same blocks for row i of every rank), shared by the ranks of one sequence group; rank 0's (and
    one process's) is the step's seed. (Offsets by an odd constant: torch's CPU generator keeps a seed's low
    32 bits only.)"""
    return step_seed(seed, step) + data_rank * 0x9E3779B1


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator a step's augmentation and packing draw from."""
    return torch.Generator().manual_seed(step_seed(seed, step))


def train_batch(run: "Run", step: int) -> Batch:
    """The batch of training step `step` (made on a loader thread): the global batch drawn and augmented
    as one process would, then this rank's rows kept."""
    data, cfg = run.splits.train, run.cfg
    epoch, i = divmod(step, run.steps_per_epoch)
    idx = _epoch_batches(len(data), cfg.batch_size, epoch, cfg.seed, cfg.repeat_aug)[i]
    g = step_generator(cfg.seed, step)
    if run.batcher is not None:                                         # images of any sizes, packed
        images = pick(data.images, idx)
        flips = torch.rand(len(images), generator=g) < 0.5 if cfg.hflip else [False] * len(images)
        images = [im.flip(-1) if f else im for im, f in zip(images, flips)]
        x = run.batcher(images, run.task.inputs, g, train=True, part=run.part)
    else:
        images = data.images[idx]                                       # uint8 (B, C, H, W)
        images = resized(images, side_at(cfg.progressive, epoch, cfg.epochs))        # progressive resizing
        images = random_crop(images, cfg.crop_padding, g)
        images = random_flip(images, g) if cfg.hflip else images
        images = rand_augment(images, *cfg.rand_augment, g) if cfg.rand_augment else images
        images = trivial_augment(images, g) if cfg.trivial_augment else images
        images = random_erase(images, cfg.random_erase, g)   # last, as in DeiT (which erases normalised images)
        x = images[run.part]
    return _pinned(Batch(x, data.labels[idx][run.part], len(idx)), run.runtime.device)


def eval_batch(data: ImageSet | NativeSet, idx: Tensor, task: Task, batcher: NativeBatcher | None,
               device: torch.device) -> Batch:
    """An evaluation batch (rows `idx` of `data`), made as in training but not augmented."""
    if batcher is not None:
        x = batcher(pick(data.images, idx), task.inputs)
    else:
        x = data.images[idx]
    return _pinned(Batch(x, data.labels[idx], len(idx)), device)


def _pinned(batch: Batch, device: torch.device) -> Batch:
    """On a GPU, the batch in page-locked memory so that the copy to the device overlaps the step."""
    if device.type != "cuda":
        return batch
    return Batch(batch.x.pin_memory(), batch.y.pin_memory(), batch.size)


def batches(make: Callable[[Any], Any], keys, cfg: TrainConfig | None, device: torch.device) -> Prefetcher:
    """make(key) for each key, made ahead on --loader-threads threads, --prefetch of them (0: each made
    when asked); the defaults' without a run config. A step on the CPU keeps its cores: the loader
    threads' torch calls then run on one intra-op thread each."""
    cfg = cfg or TrainConfig()
    return Prefetcher(make, keys, threads=cfg.loader_threads, depth=cfg.prefetch,
                      intra_op_threads=1 if device.type == "cpu" else None)


def model_inputs(task: Task, batch: Batch, device: torch.device) -> tuple[Tensor | Packed, Tensor]:
    """A batch on the device as the model takes it: images made inputs by the task (packed batches
    already are)."""
    batch = batch.to(device)
    return (batch.x if isinstance(batch.x, Packed) else task.inputs(batch.x)), batch.y


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data: ImageSet | NativeSet, batch_size: int, runtime: Runtime,
             amp: torch.dtype | None = None, stop: "StopFlag | None" = None,
             batcher: NativeBatcher | None = None, cfg: TrainConfig | None = None,
             desc: str | None = "evaluating") -> dict[str, float]:
    """The task's metrics over `data` (made inputs as in training, not augmented; images of any sizes
    packed by `batcher`); the same numbers whatever the batch size: what a task draws at random is
    drawn per example (ExampleRandom), and a packed image sees only itself. Each process scores its
    share of every batch; the sums are all-reduced. The main process shows its progress as `desc`
    (pixformer.progress; None: silent)."""
    model.eval()
    device, sums = runtime.device, {}
    shares = []
    for idx in batch_indices(len(data), batch_size, 0, 0, shuffle=False):
        share = idx.tensor_split(runtime.data_parallel)[runtime.data_rank]   # this process's; sums all-reduced
        if len(share) or runtime.world_size > 1:    # every rank runs as many batches (FSDP2 gathers weights in
            shares.append((share if len(share) else idx[:1], len(share) > 0, len(idx)))   # each), and sums the same keys
    make = lambda s: (eval_batch(data, s[0], task, batcher, device), s)   # noqa: E731
    progress = Progress(len(data), desc or "", show=desc is not None and runtime.is_main)
    with batches(make, shares, cfg, device) as made, progress:
        for batch, (idx, counted, images) in made:
            if stop is not None and runtime.world_size == 1:   # under torchrun the step's all-reduce decides
                stop.check()
            x, y = model_inputs(task, batch, device)
            with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                got = task.eval_sums(model, x, y, ExampleRandom(idx.tolist()))
            for k, v in got.items():
                sums[k] = sums.get(k, 0) + (v if counted else 0)
            progress.update(images)
    return task.metrics(runtime.all_reduce(sums))


# ---- the run -------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run holds between steps."""
    cfg: TrainConfig
    runtime: Runtime
    task: Task
    splits: Splits
    model: nn.Module                         # the weights (checkpointed)
    step_model: nn.Module                    # what a step calls: the model, or DDP / FSDP2 / sequence-parallel
    eval_model: nn.Module                    # what evaluation calls (EMA weights when kept)
    ema: nn.Module | None
    opt: torch.optim.Optimizer | Optimizers  # engine/optim.py: AdamW, LAMB, or Muon with AdamW (Optimizers)
    batcher: NativeBatcher | None            # packs images of any sizes; None for square images
    part: slice                              # this process's rows of each global batch
    amp: torch.dtype | None
    state: dict[str, Any]                    # what state.json holds (step and running added at each save)
    folder: RunFolder                        # the run folder, held by the main process alone
    steps_per_epoch: int
    total_steps: int
    warmup: int
    say: Callable[..., None]                 # the main process prints (above the bar); the others are quiet
    step: int = 0
    running: dict[str, float] = field(default_factory=dict)   # this epoch's statistics so far (sums), "_..." timings
    lr: float = 0.0
    val: dict[str, float] | None = None
    tb: Any = None
    bar: Any = None

    @property
    def name(self) -> str:
        return self.state["model_name"]

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def metrics_path(self) -> Path:
        return self.folder.metrics


def train(cfg: TrainConfig, data: Prepared | None = None) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data` for `cfg.task`; returns the final metrics (`val_*`, `test_*`),
    the run folder and the trained model(s). A run with `resume=True` continues from the checkpoint in
    `cfg.out` to the same result as an uninterrupted run: the data order, augmentation and dropout
    are seeded by (seed, step), and a stop is only taken between whole steps."""
    if cfg.resume and not cfg.out:
        raise PixformerError("--resume needs --out, the folder of the run to continue")
    if cfg.out:
        check_out_folder(cfg.out)                                        # not RUN/checkpoint
    cfg.speed.check()                                                    # bad names before any work
    task_cls, task_cfg = get_task(cfg.task), task_config(cfg.task, cfg.task_args)
    check_model_args(cfg.model, cfg.model_args)
    if task_cls.needs_init and not cfg.init:
        raise PixformerError(f"--task {cfg.task} needs --init RUN, the trained run whose encoder it starts from")
    if cfg.init and not Path(cfg.init).exists():
        raise PixformerError(f"--init {cfg.init} does not exist")
    if cfg.init and find_checkpoint(cfg.init) is None and foreign_format(cfg.init) is None:
        raise PixformerError(f"--init {cfg.init}: not a pixformer run (state.json and model.safetensors), a "
                             "transformers ViT folder (config.json and safetensors) or a timm ViT state dict (.safetensors)")
    saved = _resumable_state(cfg)                                        # before any data is loaded
    check_run(cfg, task_cls, resuming=saved is not None)
    runtime = Runtime.create(cfg.device, cfg.seq_parallel, cfg.seq_sharding, cfg.fsdp, cfg.seed)
    folder = claim(cfg.out, rank=runtime.rank) if cfg.out else None    # a folder in use: one line, no work
    run = None
    try:
        check_one_image_fits(cfg, task_cls, runtime)                     # before any data is decoded
        if folder is not None and not cfg.resume and find_checkpoint(cfg.out) is not None:
            raise PixformerError(f"{cfg.out} already holds a run; pass --resume to continue it or choose another --out")
        if folder is not None:
            check_holds_no_other_files(cfg.out)                          # nothing of the user's is replaced
        run = start(cfg, data, runtime, task_cls, task_cfg, saved, folder)
        result = fit(run)
    except BaseException as e:
        runtime.close(barrier=False)     # the other ranks may be inside a collective: do not wait for them
        if runtime.world_size > 1 and lost_peer(e):
            where = f"; the last checkpoint in {run.run_dir} is kept" if run is not None else ""
            why = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", str(e).splitlines()[0])   # no C++ source paths
            raise PixformerError(f"another process of this run stopped or died (this rank's collective failed: "
                                 f"{_short(why, 120)}){where}") from None
        if out_of_memory(e):
            raise PixformerError(_out_of_memory_line(cfg, run, e)) from None
        raise
    finally:
        held = run.folder if run is not None else folder
        if held is not None:
            held.close()
    runtime.close()
    return result


def _out_of_memory_line(cfg: TrainConfig, run: Run | None, error: BaseException) -> str:
    """The one line for a run whose memory ran out: what failed, where to see what fits, and what is kept."""
    size = f" --img-size {cfg.img_size}" if cfg.img_size else ""
    kept = (f"; the last checkpoint in {run.run_dir} is kept (continue with --resume)"
            if run is not None and find_checkpoint(run.run_dir) is not None else "")
    asked = re.search(r"allocate (\d+) bytes", str(error))        # the CPU allocator's message (a GPU's: its own)
    what = (f"{format_bytes(int(asked[1]))} more could not be allocated" if asked
            else _short(str(error).strip().splitlines()[0], 120))
    return (f"out of memory ({what}): `pixformer plan --model {cfg.model}{size} "
            f"--batch-size {cfg.batch_size}` shows what fits; try a smaller --batch-size, --accum-steps, "
            f"--checkpoint-blocks all or smaller images{kept}")


def start(cfg: TrainConfig, data: Prepared | None, runtime: Runtime, task_cls: type[Task], task_cfg,
          saved: dict[str, Any] | None, folder: RunFolder | None) -> Run:
    """The run, ready for its first (or resumed) step: data, task, model and its speed switches,
    optimizer, the run folder, and the saved state loaded when resuming."""
    amp = autocast_dtype(cfg.precision, runtime.device)
    data = data or prepare_data(cfg)
    task = task_cls(task_cfg, data.facts)
    prep = lambda s: None if s is None else task.prepare(s)            # noqa: E731
    splits = Splits(prep(data.splits.train), prep(data.splits.val), prep(data.splits.test), data.splits.val_from)
    say = tqdm.write if runtime.is_main else (lambda *a, **k: None)     # one process speaks (above the bar)

    torch.manual_seed(cfg.seed)
    with runtime.building():                     # FSDP2: only rank 0 holds the whole model (the others: meta)
        model = task.build_model(cfg.model, cfg.model_args)
    if cfg.init and saved is None and runtime.holds_weights:            # a resumed run has its own weights
        got = init_from(model, cfg.init, task.fresh_on_init)
        say(f"init from {cfg.init} ({got['format']}): loaded {len(got['loaded'])} tensors; new: "
            f"{summarize_keys(got['new'])}; not used: {summarize_keys(got['unused'])}"
            + (f"; converted: {', '.join(got['converted'])}" if got["converted"] else ""))
    set_attention_backend(model, cfg.speed.attn_backend)             # before the copy: EMA evaluates with it too
    if not runtime.fsdp:
        model.to(runtime.device)                 # (FSDP2 moves each block's shard there when it shards it)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    speed = resolved_speed(cfg, runtime, data.facts, amp, task, model)
    apply_speed_settings(model, **speed)                                 # from outside the model
    regather, regather_line = seq_regather_layers(cfg, runtime, data.facts, speed, amp)
    if regather_line:
        say(regather_line)

    name = model_name(model)
    steps_per_epoch = max(len(splits.train) // cfg.batch_size, 1)
    facts = data.facts
    state = {"train_config": {**as_json(cfg), "data": source_id(cfg.data)},     # resumable from any folder
             "task": {"name": task.name, "config": asdict(task_cfg)},
             "model": model_spec(model), "model_name": name, "step": 0, "epochs_logged": 0,
             "data": {**asdict(facts), "source": source_id(cfg.data), "val_from": splits.val_from,
                      "val_fraction": cfg.val_fraction, "has_test": splits.test is not None},
             f"best_{task.best[0]}": None, "test": None, "weights": "ema" if ema is not None else "model",
             "speed": {**speed, "precision": str(amp or torch.float32)[6:],   # as resolved for this run
                       "seq_regather_layers": regather}}
    # bad packing settings are refused here, before any claim
    batcher = batcher_for(as_json(cfg), *token_layout(model), runtime.device, cfg.speed.compile)
    batch = min(cfg.batch_size, len(splits.train))                     # a batch larger than the set: the whole set
    part = runtime.part(batch)
    if cfg.accum_steps > part.stop - part.start:
        raise PixformerError(f"--accum-steps {cfg.accum_steps} splits the {part.stop - part.start} images each process "
                             f"trains a step into micro-batches: at most {part.stop - part.start}")
    claimed = folder is None
    folder = folder or claim(default_run_dir(name, data=cfg.data), rank=runtime.rank)
    warmup, total = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    if total and warmup >= total:
        say(f"the learning rate warms up over the whole run (--warmup-epochs {cfg.warmup_epochs:g}, --epochs "
            f"{cfg.epochs}) and never decays: give a smaller --warmup-epochs or more --epochs")
    run = Run(cfg, runtime, task, splits, model, model, model, ema, None, batcher, part, amp, state,
              folder, steps_per_epoch, total, warmup, say)
    try:
        attach(run, saved)
    except BaseException:
        if claimed:                   # a folder this function claimed is released (removed if still empty)
            folder.close()
        raise
    return run


def attach(run: Run, saved: dict[str, Any] | None) -> None:
    """The run's folder, optimizer and wrappers: the checkpoint loaded when resuming, the model wrapped
    for this runtime (DDP, FSDP2, sequence parallel), the optimizer built, config.json and the log prepared."""
    cfg, runtime, model = run.cfg, run.runtime, run.model
    ckpt = find_checkpoint(run.run_dir)
    if saved is not None:
        load_saved(run, saved, ckpt)
    elif cfg.resume and (run.run_dir / "config.json").exists():     # a run stopped before its first checkpoint
        run.say(f"no checkpoint in {run.run_dir} (stopped before its first one); starting from scratch")
    if cfg.resume and not runtime.same_everywhere(run.step if saved is not None else -1):   # on every rank, before
        raise PixformerError(f"the processes of this run resume {run.run_dir} at different steps (or some find no "
                             "checkpoint there); they must all read the same run folder")   # any other collective
    regather = run.state["speed"]["seq_regather_layers"]   # sequence parallel: layers gathering keys again
    run.step_model = runtime.wrap(model, regather=regather)  # DDP, FSDP2 (shards `model` in place) or sequence-parallel
    run.eval_model = runtime.wrap(run.ema or model, train=False)
    run.opt = build_optimizer(model, cfg, replicas=runtime.replicas)
    if saved is not None:
        load_optimizer(run, ckpt, saved)
    if runtime.is_main:                  # only the main process writes checkpoints and logs
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(run.run_dir / "config.json", json.dumps(run.state["train_config"], indent=1))
        if saved is None:
            trim_metrics(run.metrics_path, None)     # rows of an attempt that never checkpointed
        run.tb = _tensorboard(run.run_dir, cfg.tensorboard, run.say)
    run.lr = lr_at(max(run.step - 1, 0), run.total_steps, run.warmup, cfg.lr, cfg.min_lr, cfg.lr_schedule)  # the last step's


def resolved_speed(cfg: TrainConfig, runtime: Runtime, facts: DataFacts, amp, task: Task,
                   model: nn.Module) -> dict[str, Any]:
    """The run's speed switches with the automatic ones decided for this machine and run."""
    speed = asdict(cfg.speed)
    if speed["onednn_linear"] is None:
        speed["onednn_linear"] = runtime.device.type == "cpu" and onednn_pays()
    tokens = task.block_tokens(model) if speed["selective_checkpoint"] is None else None
    above = selective_above(runtime.device)            # 1 GiB on a CPU, half a GPU's memory
    if tokens is not None:                 # blocks seeing different sequences: counted on the built model
        speed["selective_checkpoint"] = blocks_peak_bytes(
            model, tokens, -(-cfg.batch_size // (runtime.data_parallel * cfg.accum_steps)), "bf16" if amp else "fp32",
            cfg.speed.attn_backend, cfg.speed.lean_mlp_on, cfg.speed.lean_norms_on) > above
    elif speed["selective_checkpoint"] is None:
        size, chans = task.model_space()                   # a latent DiT: its latents' grid, not the images'
        speed["selective_checkpoint"] = selective_pays(cfg.model, size, -(-cfg.batch_size // cfg.accum_steps),
                                                       "bf16" if amp else "fp32", cfg.speed.attn_backend,
                                                       len(facts.classes), chans, above, **cfg.model_args,
                                                       seq_parallel=runtime.seq_parallel,      # per rank
                                                       data_parallel=runtime.data_parallel,
                                                       lean_mlp=cfg.speed.lean_mlp_on,
                                                       lean_norms=cfg.speed.lean_norms_on)
    return speed


def seq_regather_layers(cfg: TrainConfig, runtime: Runtime, facts: DataFacts, speed: dict[str, Any],
                        amp) -> tuple[int, str | None]:
    """Under sequence parallelism: how many layers (the first) gather their keys and values again in the
    backward, --seq-regather as the planner resolves it for this run's checkpointing (the same on every
    rank: a function of the settings and the model), and the line saying what it costs; else (0, None)."""
    if runtime.seq_parallel == 1:
        return 0, None
    p = plan(cfg.model, facts.img_size, -(-cfg.batch_size // cfg.accum_steps), precision="bf16" if amp else "fp32",
             attn_backend=cfg.speed.attn_backend, num_classes=len(facts.classes), in_chans=facts.in_chans,
             seq_parallel=runtime.seq_parallel, data_parallel=runtime.data_parallel, seq_regather=cfg.seq_regather,
             lean_mlp=cfg.speed.lean_mlp_on, lean_norms=cfg.speed.lean_norms_on, **cfg.model_args)
    mode = "full" if checkpoint_count(speed["checkpoint_blocks"], p.depth) == p.depth else \
        "selective" if speed["selective_checkpoint"] else "none"
    return p.regather_layers[mode], p.regather_line(mode)


def load_saved(run: Run, saved: dict[str, Any], ckpt: Path) -> None:
    """Continue from a checkpoint: the same model (or a clear error), its weights, the counters, and
    the metrics log without the rows logged after the checkpoint (they are computed again)."""
    spec = json.loads(json.dumps(run.state["model"]))   # as stored: JSON turns tuples (img_size) into lists
    if saved["model"] != spec:
        diff = sorted(k for k in set(saved["model"]["config"]) | set(spec["config"])
                      if saved["model"]["config"].get(k) != spec["config"].get(k))
        raise PixformerError(f"cannot resume {run.run_dir}: its checkpoint is a different model (differs in {diff})")
    if run.runtime.holds_weights:              # FSDP2: rank 0 loads, wrap hands each rank its shard
        load_weights(run.model, ckpt / "model.safetensors")
    if run.ema is not None:
        load_weights(run.ema, ckpt / "ema.safetensors")
    metric = run.task.best[0]
    for k in ("step", "epochs_logged", f"best_{metric}", "test"):
        run.state[k] = saved[k]
    run.step, run.running = saved["step"], saved["running"]
    if run.runtime.is_main:
        trim_metrics(run.metrics_path, lambda r: (run.state["test"] is not None if _is_test_row(r)
                                                  else r.get("epoch", 0) <= run.state["epochs_logged"]))
    run.say(f"resuming {run.run_dir} at step {run.step}/{run.total_steps}")


def load_optimizer(run: Run, ckpt: Path, saved: dict[str, Any]) -> None:
    """The optimizer's state from the checkpoint: read by every process, or under FSDP2 by rank 0
    alone, each rank receiving only its shard."""
    if run.runtime.fsdp and not run.runtime.is_main:
        run.runtime.load_optimizer(run.model, run.opt, None)
        return
    state = optimizer_state(load_tensors(ckpt / "optimizer.safetensors"), saved["optimizer"])
    run.runtime.load_optimizer(run.model, run.opt, state)


def fit(run: Run) -> dict[str, Any]:
    """Steps until the run's last, validating at the end of each epoch and testing once at the end; a
    stop asked is taken after a whole step (checkpointed, with the command that continues it)."""
    cfg, metric = run.cfg, run.task.best[0]
    run.bar = Progress(run.total_steps, f"training {run.name} on {Path(cfg.data).name}", unit="steps", short="steps",
                       show=cfg.progress and run.runtime.is_main, initial=run.step, leave=True)
    try:
        with StopFlag() as stop, batches(lambda s: train_batch(run, s), range(run.step, run.total_steps), cfg,
                                       run.runtime.device) as feed:
            while True:
                if run.state["epochs_logged"] < run.step // run.steps_per_epoch:   # an epoch ended (again, after a stop)
                    end_of_epoch(run, stop)
                if run.step >= run.total_steps:
                    break
                waited = feed.waited
                step(run, next_batch(run, feed), stop, feed.waited - waited)
                if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step % run.steps_per_epoch:
                    checkpoint(run)
            run.bar.close()                                                  # the steps are done
            if run.splits.test is not None and run.state["test"] is None:   # once, at the end
                run.state["test"] = evaluate(run.task, run.eval_model, run.splits.test, cfg.eval_batch_size,
                                             run.runtime, run.amp, stop, run.batcher, cfg,
                                             desc="testing" if cfg.progress else None)
                log(run, {"step": run.step, "epoch": cfg.epochs,
                          **{f"test_{k}": v for k, v in run.state["test"].items() if k != "n"}})
                checkpoint(run)
    except _Stop as why:
        run.bar.close()
        checkpoint(run)
        raise Stopped(f"stopped ({why}) at step {run.step}/{run.total_steps}; checkpoint saved. Continue with: "
                      f"{continue_command(run)}", str(why)) from None
    except KeyboardInterrupt:                       # a second Ctrl-C: no checkpoint now
        kept = (f"the checkpoint in {run.run_dir} is kept" if (run.run_dir / "checkpoint" / "state.json").exists()
                else "no checkpoint was written yet")
        raise Stopped(f"stopped at once (a second Ctrl-C) at step {run.step}/{run.total_steps}; {kept}. Continue "
                      f"with: {continue_command(run)}", "SIGINT") from None
    finally:
        run.bar.close()
        if run.tb is not None:
            run.tb.close()
    if run.val is None:  # resumed a run whose last epoch was validated before
        run.val = evaluate(run.task, run.eval_model, run.splits.val, cfg.eval_batch_size, run.runtime, run.amp,
                           batcher=run.batcher, cfg=cfg, desc="validating" if cfg.progress else None)
    return {"run_dir": str(run.run_dir), "model_name": run.name, "step": run.step,
            f"best_{metric}": run.state[f"best_{metric}"], **{f"val_{k}": v for k, v in run.val.items()},
            **{f"test_{k}": v for k, v in (run.state["test"] or {}).items()}, "model": run.model, "ema": run.ema}


def next_batch(run: Run, feed: Prefetcher) -> Batch:
    """The next training batch. A batch this rank could not make (an image that fails to decode) is its
    own error: it says so, named, and its peers stop on its departure."""
    try:
        return next(feed)
    except PixformerError as e:
        if run.runtime.world_size > 1:
            e.rank = run.runtime.rank
        raise


def step(run: Run, batch: Batch, stop: StopFlag, waited: float) -> None:
    """One optimizer step on `batch`. Its statistics, and the flags every rank decides by (a stop
    asked, a non-finite loss), are summed over the ranks in one all-reduce before the update: all
    ranks then update, or none; all stop after this step, or none."""
    cfg, runtime, s = run.cfg, run.runtime, run.step
    t0 = time.perf_counter()
    run.model.train()
    torch.manual_seed(dropout_seed(cfg.seed, s, runtime.data_rank))     # dropout / drop-path
    x, y = model_inputs(run.task, batch, runtime.device)
    run.lr = lr_at(s, run.total_steps, run.warmup, cfg.lr, cfg.min_lr, cfg.lr_schedule)
    for group in run.opt.param_groups:
        group["lr"] = run.lr * group["lr_scale"]
    run.opt.zero_grad(set_to_none=True)
    loss, stats = forward_backward(run, x, y, batch.size)
    runtime.sync_gradients(run.model)                                    # sequence parallel: LSS's averaging
    if isinstance(x, Packed):                                            # packed slots, and those holding tokens
        stats = {**stats, "_useful": x.useful, "_slots": x.segments.numel()}
    stats = runtime.all_reduce({**stats, "_nonfinite": float(not torch.isfinite(loss)),
                                "_stop": float(stop.asked is not None)}, every_rank=("_nonfinite", "_stop"))
    if stats.pop("_nonfinite"):
        raise PixformerError(f"the loss became non-finite ({loss.item()} here) at step {s}; nothing of this step "
                             "was applied. Lower --lr or use --precision fp32")
    stop_now = stats.pop("_stop") > 0
    if cfg.clip_grad > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
    run.opt.step()
    if run.ema is not None:
        update_ema(run.ema, run.model, cfg.ema_decay)
    run.step += 1
    if s % run.steps_per_epoch == 0:
        run.running = {}
    for k, v in {**stats, "_seconds": time.perf_counter() - t0 + waited, "_wait": waited}.items():
        run.running[k] = run.running.get(k, 0) + v
    show_progress(run, s // run.steps_per_epoch)
    if stop_now or (runtime.world_size == 1 and stop.asked):             # one process: a signal in this step too
        raise _Stop(stop.asked or "asked of another process of this run")


def _short(text: str, limit: int = 200) -> str:
    """`text` cut at a word before `limit` characters, saying so, for a one-line error."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def micro_batches(rows: int, accum_steps: int) -> list[slice]:
    """This process's `rows` of a step split into `accum_steps` consecutive micro-batches, their sizes
    differing by at most one (cut as `evaluate` cuts a batch over processes: the larger ones first)."""
    size, larger = divmod(rows, accum_steps)
    ends = [(j + 1) * size + min(j + 1, larger) for j in range(accum_steps)]
    return [slice(end - size - (j < larger), end) for j, end in enumerate(ends)]


def forward_backward(run: Run, x: Tensor | Packed, y: Tensor, global_batch: int) -> tuple[Tensor, dict[str, float]]:
    """The step's loss (the mean over this process's rows) and summed statistics, its gradients left in
    the weights: in one pass, or in --accum-steps micro-batches whose gradients add up to the same. Each
    micro-batch draws the task's random numbers for the whole global batch from the step's generator
    and keeps its rows', so every image gets the numbers it would get in one pass on one process (but
    mixup and CutMix pair images within a micro-batch, and dropout masks are drawn per process)."""
    cfg, runtime = run.cfg, run.runtime
    amp = dict(device_type=runtime.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None)
    parts = micro_batches(len(y), cfg.accum_steps)
    total, stats = 0.0, {}
    for j, part in enumerate(parts):
        rows = slice(run.part.start + part.start, run.part.start + part.stop)   # of the global batch
        rng = RankRandom(np.random.default_rng([cfg.seed, run.step]), rows, global_batch)
        share = (part.stop - part.start) / len(y)
        xs = x if len(parts) == 1 else x[part]                          # (a packed batch is never split)
        with runtime.accumulating(run.step_model, last=j == len(parts) - 1):   # the ranks average once, at the last
            with torch.autocast(**amp):
                loss, part_stats = run.task.loss(run.step_model, xs, y[part], rng)
            (loss if share == 1 else loss * share).backward()   # also when non-finite: collectives stay in step
        total = total + loss.detach() * share
        for k, v in part_stats.items():
            stats[k] = stats.get(k, 0) + v
    return total, stats


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for floating tensors; the others (BatchNorm's count) copied."""
    pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))
    floats = [(e, m) for e, m in pairs if e.is_floating_point()]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - decay)
    for e, m in pairs:
        if not e.is_floating_point():
            e.copy_(m)


def show_progress(run: Run, epoch: int) -> None:
    """One step more on the training bar (or its plain lines), with the epoch's running statistics."""
    r = run.running
    n = max(r.get("n", 0), 1)
    run.bar.update(1, epoch=epoch + 1, **{k: f"{v / n:.3f}" for k, v in r.items() if not k.startswith("_") and k != "n"},
                   img_s=f"{r.get('n', 0) / max(r['_seconds'], 1e-9):.0f}",
                   wait=f"{100 * r['_wait'] / max(r['_seconds'], 1e-9):.0f}%", lr=f"{run.lr:.1e}")


def end_of_epoch(run: Run, stop: StopFlag) -> None:
    """Validate the epoch that ended when it is due (--eval-every), keep the best metric, log a row,
    write the task's figures and checkpoint."""
    cfg, r, epoch = run.cfg, run.running, run.step // run.steps_per_epoch
    metric, better = run.task.best
    run.val = None
    if epoch >= cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
        run.val = evaluate(run.task, run.eval_model, run.splits.val, cfg.eval_batch_size, run.runtime, run.amp, stop,
                           run.batcher, cfg, desc="validating" if cfg.progress else None)
        best = run.state[f"best_{metric}"]
        if best is None or (run.val[metric] > best if better == "max" else run.val[metric] < best):
            run.state[f"best_{metric}"] = run.val[metric]
    val = {k: v for k, v in (run.val or {}).items() if k != "n"}
    n, seconds = max(r.get("n", 0), 1), max(r.get("_seconds", 0), 1e-9)
    record = {"step": run.step, "epoch": epoch, "lr": run.lr,
              **{f"train_{k}": v / n for k, v in r.items() if not k.startswith("_") and k != "n"},
              "img_per_s": r.get("n", 0) / seconds, "data_wait": r.get("_wait", 0.0) / seconds,
              **({"train_padding": 1 - r["_useful"] / r["_slots"]} if "_slots" in r else {}),
              **{f"val_{k}": v for k, v in val.items()}}
    log(run, record)
    run.say(f"{run.name} epoch {epoch}/{cfg.epochs}  train loss {record.get('train_loss', 0):.4f}  "
            + "".join(f"val {run.task.shown_as.get(k, k)} {v:.4f}  " for k, v in val.items())
            + f"(data wait {100 * record['data_wait']:.0f} %)")
    if run.val is not None and (run.runtime.is_main or run.runtime.fsdp):   # FSDP2: every rank runs the forwards
        try:
            run.task.report(run.ema or run.model, run.splits.val, run.run_dir if run.runtime.is_main else None, epoch)
        except PixformerError as e:               # a figure that cannot be written costs the figure, not the run
            run.say(f"{e}; training goes on")
    run.state["epochs_logged"] = epoch
    checkpoint(run)


def checkpoint(run: Run) -> None:
    """Write the run's checkpoint (every rank takes part: FSDP2 gathers to rank 0, which writes)."""
    full = run.runtime.checkpoint_state(run.model, run.opt)
    if full is not None:
        save_checkpoint(run.run_dir, {**run.state, "step": run.step, "running": run.running}, full[0], full[1], run.ema)


def log(run: Run, record: dict) -> None:
    """One row of metrics.jsonl (and TensorBoard's scalars), written by the main process alone."""
    if not run.runtime.is_main:
        return
    append_metrics(run.metrics_path, record)
    if run.tb is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                run.tb.add_scalar(k, v, record["step"])


_TENSORBOARD_SAID = []     # the notice that TensorBoard is missing, said once per process


def _tensorboard(run_dir: Path, wanted: bool | None, say: Callable[..., None]):
    """A TensorBoard writer into RUN/tb: when asked for (`wanted` True) or by default (None) when
    tensorboard is installed; None when off. Asked for and missing: one notice (once per process),
    and the run goes on with metrics.jsonl."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # tensorboard is optional (an extra)
        if wanted and not _TENSORBOARD_SAID:
            _TENSORBOARD_SAID.append(True)
            say(f"no TensorBoard logs: {'tensorboard is not installed' if isinstance(e, ImportError) else e} "
                f"({install_hint('tensorboard')}); the metrics are in {run_dir / 'metrics.jsonl'}")
        return None
    return SummaryWriter(str(run_dir / "tb"))
