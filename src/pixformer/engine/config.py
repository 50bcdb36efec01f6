"""A training run's settings: one small dataclass for what every task shares. The model's settings
(`model_args`) and the task's (`task_args`) are mappings validated against their own dataclasses
(ViTConfig / ConvMixerConfig, ClassifyConfig, ...), so a new field there needs no field here; the
speed switches are perf.Speed. The whole config is saved in every checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..data.native import is_native
from ..models.registry import model_settings
from ..tasks import task_settings
from .perf import Speed


@dataclass
class TrainConfig:
    # what to train, on what
    task: str = "classify"              # classify (pixformer.tasks)
    model: str = "vit-n/2"              # a name from `pixformer models`
    model_args: dict[str, Any] = field(default_factory=dict)  # model settings over the name's, e.g. {depth: 4,
    #                                     pos_embed: sincos2d}; on the command line also --depth 4 --pos-embed ...
    task_args: dict[str, Any] = field(default_factory=dict)   # the task's settings, e.g. {label_smoothing: 0.1,
    #                                     mixup: 0.8}; on the command line also --label-smoothing 0.1 --mixup 0.8
    data: str = "digits"                # digits | cifar10 | cifar100 | mnist | fashion-mnist | ImageFolder path
    data_root: str | None = None        # where named datasets live / download to (default ~/.cache/pixformer/data)
    img_size: int | None = None         # resize images to img_size x img_size (default: native size)
    out: str | None = None              # run folder (default runs/<model>-<data>-<time>)
    speed: Speed = field(default_factory=Speed)  # speed and memory switches (--attn-backend, --compile, ...)
    init: str | None = None             # start from a run's weights, matched by name (an MAE run's encoder
    #                                     for a classifier or a probe); the position table is resampled
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3                    # peak learning rate (AdamW)
    min_lr: float = 1e-5                # end of the cosine
    weight_decay: float = 0.05          # on the weights of linear and conv layers only
    layer_decay: float = 1.0            # layer-wise lr decay (MAE fine-tuning: 0.75): block i of L gets
    #                                     lr * decay^(L - i), what comes before the blocks decay^(L + 1)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    clip_grad: float = 1.0              # max gradient norm; 0 = off
    ema_decay: float = 0.0              # weight EMA per step; 0 = off (e.g. 0.999)
    # augmentation of the uint8 images, before normalisation (every image task)
    crop_padding: int = 0               # random crop with this zero (black) padding; 0 = off
    hflip: bool = False                 # random horizontal flip
    # native resolution (NaViT's Patch n' Pack, data/native.py): images keep their size and aspect ratio,
    # several are packed into one sequence; a ViT attends and pools within each image. On when a budget is set.
    max_side: int | None = None         # scale each image down so its longer side is at most this (pixels)
    max_tokens: int | None = None       # scale each image down to at most this many tokens
    resolution_range: tuple[int, int] | None = None  # training: each image's longer side drawn from [LO, HI]
    pack_length: int | None = None      # tokens per packed sequence (unset: a row per image, padded to the largest)
    max_per_pack: int = 64              # images per packed sequence at most
    token_drop: float = 0.0             # training: rate of each image's tokens dropped before packing
    token_drop_beta: tuple[float, float] | None = None  # training: the rate drawn per image from Beta(A, B)
    # data handling
    val_fraction: float = 0.1           # held out of train (seed 0) when the data has no val split
    train_subset: int | None = None     # train on a seeded random subset of this many images
    skip_bad_images: bool = False       # count and skip unreadable images instead of stopping
    image_column: str | None = None     # a Hugging Face dataset's image column (default: image / img)
    label_column: str | None = None     # its label column (default: label / labels / fine_label)
    workers: int | None = None          # processes decoding images into the cache (default: every core)
    loader_threads: int = 2             # threads making the next batches while the step runs
    prefetch: int = 4                   # batches made ahead of the step (0: each made when the step asks)
    # locality ablations: one fixed pixel permutation of every image (data/ablations.py)
    permute_pixels: bool = False        # shuffle all pixel positions
    local_swaps: int = 0                # the PiT paper's T: swaps of pixel pairs ...
    swap_distance: int | None = None    # ... at most δ apart (Chebyshev); unset = anywhere
    permute_seed: int = 0               # draws the permutation
    # parallelism under torchrun (engine/runtime.py): data parallel (DDP) by default
    seq_parallel: int = 1               # ranks that split each image's tokens (LSS; world = P x data-parallel D)
    seq_sharding: str = "contiguous"    # which tokens a rank holds: contiguous | strided | random (seeded)
    seq_regather: bool = False          # gather keys / values again in backward instead of keeping them (memory)
    fsdp: bool = False                  # shard weights, gradients and optimizer state (FSDP2) instead of DDP
    # run control
    seed: int = 0
    precision: str = "auto"             # auto (bf16 where native: GPUs, AMX / AVX512-BF16 CPUs) | fp32 | bf16
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 512
    checkpoint_every: int = 0           # also checkpoint every N steps (0: at the end of each epoch only)
    resume: bool = False                # continue the run in `out` from its checkpoint
    progress: bool = True               # show progress: a bar on a terminal, plain periodic lines in a log
    tensorboard: bool | None = None     # TensorBoard logs in RUN/tb: unset = when tensorboard is installed,
    #                                     true = asked for (a one-line notice if it is not installed), false = off

    def __post_init__(self):
        if isinstance(self.speed, dict):
            self.speed = Speed(**self.speed)
        self.model_args = dict(self.model_args or {})
        self.task_args = dict(self.task_args or {})

    @property
    def native(self) -> bool:
        """Whether images keep their own sizes (a --max-side or --max-tokens budget is set)."""
        return is_native(vars(self))


# Settings that change how a run executes but not what it computes (beyond float rounding): a run may
# be resumed, or a cached sweep point reused, with these changed; any other change is refused.
RUN_ONLY = ("out", "resume", "progress", "tensorboard", "device", "eval_batch_size", "checkpoint_every", "data_root", "speed",
            "seq_parallel", "seq_sharding", "seq_regather", "fsdp", "workers", "loader_threads", "prefetch")


def as_json(cfg: TrainConfig) -> dict[str, Any]:
    """The config as stored in state.json and config.json (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """'name: old -> new' for each setting (outside RUN_ONLY) in which `cfg` differs from a saved config."""
    new = as_json(cfg)
    return [f"{k}: {saved.get(k)} -> {new.get(k)}" for k in sorted(set(saved) | set(new))
            if k not in RUN_ONLY and saved.get(k) != new.get(k)]


def setting_shortcuts() -> dict[str, tuple[str, Any]]:
    """The flat options for the fields of the model and task dataclasses (`--depth` for
    model_args.depth, `--mixup` for task_args.mixup): name -> (mapping, type)."""
    return {**{k: ("model_args", t) for k, t in model_settings().items()},
            **{k: ("task_args", t) for k, t in task_settings().items()}}


def config_from_options(values: dict[str, Any], skip: set[str] = frozenset()) -> TrainConfig:
    """A TrainConfig from flat options (the command line's): TrainConfig fields, less `skip`, with each
    shortcut merged into its mapping (a shortcut wins over the same key given in the mapping)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(skip)
    kw = {k: values[k] for k in fields if k in values}
    for name, (mapping, _) in setting_shortcuts().items():
        if values.get(name) is not None and name not in skip:
            kw[mapping] = {**(kw.get(mapping) or {}), name: values[name]}
    if "speed" in kw:
        kw["speed"] = Speed(**dict(kw["speed"]))
    return TrainConfig(**kw)
