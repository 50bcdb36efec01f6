"""A training run's settings: one small dataclass for what every task shares. The model's settings
(`model_args`) and the task's (`task_args`) are mappings validated against their own dataclasses
(ViTConfig / ConvMixerConfig, ClassifyConfig, ...), so a new field there needs no field here; the
speed switches are perf.Speed. The whole config is saved in every checkpoint.

Each field's comment is its help text in `pixformer train --help`, each heading comment a group of
options there (pixformer.settings reads them); a bad value is one line naming its option, raised
when the config is made (TrainConfig.__post_init__), before any work.

A run's saved settings come back with `TrainConfig.from_run(RUN)`; the command line takes them for a
--resume (resume_options) and a run's architecture for an --init (init_options)."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..data.native import is_native
from ..data.splits import source_id
from ..errors import PixformerError
from ..models.registry import ARCHITECTURES, DATA_FIELDS, NAMED, architecture
from ..settings import check_fields, field_docs, option, require
from ..tasks import TASKS, task_config
from .optim import LR_SCHEDULES, OPTIMIZERS
from .perf import ALLOCATOR_POLICIES, Speed
from .plan import check_regather

MAX_IMG_SIZE = 8192     # --img-size at most: one 8192x8192 RGB image is 192 MiB decoded


@dataclass
class TrainConfig:
    """The settings of a training run (`pixformer train --help` lists them, grouped as below). Each
    field's comment is its help text; each heading comment names a group of options."""
    # model: the network trained; its settings are --model-args or one option each (--depth 4 --pos-embed ...)
    model: str = "vit-n/2"              # a name from `pixformer models` (vit-s/4, pit-t, convmixer-256/8, ...) or
    #                                     a run's own printed name (pit-d4w64: depth 4, width 64); with --init RUN
    #                                     and no --model: RUN's architecture
    model_args: dict[str, Any] = field(default_factory=dict)  # model settings over the name's, e.g. {depth: 4,
    #                                     pos_embed: sincos2d}; on the command line also --depth 4 --pos-embed ...
    init: str | None = None             # start from a run's weights, matched by name (an MAE run's encoder
    #                                     for a classifier or a probe), a transformers ViT folder or a timm ViT
    #                                     .safetensors file; the position table is resampled
    # task: what the run optimises and measures; its settings are --task-args or one option each (--mixup 0.8)
    task: str = "classify"              # classify (supervised), mae (masked-autoencoder pretraining), probe (a
    #                                     linear probe of --init RUN's encoder), diffusion (DiT)
    task_args: dict[str, Any] = field(default_factory=dict)   # the task's settings, e.g. {label_smoothing: 0.1,
    #                                     mixup: 0.8}; on the command line also --label-smoothing 0.1 --mixup 0.8
    # data: the images, their splits and how they are read
    data: str = "digits"                # digits | cifar10 | cifar100 | mnist | fashion-mnist | ImageFolder path
    #                                     (a folder or .tar) | Hugging Face dataset (parquet, save_to_disk folder)
    data_root: str | None = None        # where named datasets live / download to (default ~/.cache/pixformer/data)
    img_size: int | None = None         # resize images to img_size x img_size (default: native size)
    val_fraction: float = 0.1           # held out of train (seed 0) when the data has no val split
    train_subset: int | None = None     # train on a seeded random subset of this many images
    skip_bad_images: bool = False       # count and skip unreadable images instead of stopping
    image_column: str | None = None     # a Hugging Face dataset's image column (default: image / img)
    label_column: str | None = None     # its label column (default: label / labels / fine_label)
    workers: int | None = None          # processes decoding images into the cache (default: every core)
    loader_threads: int = 2             # threads making the next batches during the step (on CPU: one torch thread each)
    prefetch: int = 4                   # batches made ahead of the step (0: each made when the step asks)
    # augmentation: of the uint8 images, before normalisation (every image task)
    crop_padding: int = 0               # random crop with this zero (black) padding; 0 = off
    hflip: bool = False                 # random horizontal flip
    rand_augment: tuple[int, int] | None = None  # RandAugment: N ops per image at magnitude M (of 30), torchvision's
    #                                     ops and ranges, e.g. [2, 9] (DeiT); unset = off
    trivial_augment: bool = False       # TrivialAugmentWide: one op per image at a random magnitude of the wide ranges
    random_erase: float = 0.0           # random erasing: with this probability an image gets a rectangle (2-33 %
    #                                     of it) of uniform noise (DeiT: 0.25); 0 = off
    repeat_aug: int = 1                 # repeated augmentation: each image K times in a batch, each copy augmented
    #                                     on its own; as many steps an epoch (DeiT: 3); 1 = off
    # native resolution: NaViT's Patch n' Pack (data/native.py); images keep their size and aspect ratio,
    # several are packed into one sequence; a ViT attends and pools within each image. On when a budget is set.
    max_side: int | None = None         # scale each image down so its longer side is at most this (pixels)
    max_tokens: int | None = None       # scale each image down to at most this many tokens
    resolution_range: tuple[int, int] | None = None  # training: each image's longer side drawn from [LO, HI]
    pack_length: int | None = None      # most tokens in a packed sequence (unset: a row per image, padded)
    max_per_pack: int = 64              # images per packed sequence at most
    token_drop: float = 0.0             # training: rate of each image's tokens dropped before packing
    token_drop_beta: tuple[float, float] | None = None  # training: the rate drawn per image from Beta(A, B)
    # optimisation: the optimizer, the learning rate per step (warm-up, then decay) and the training image side per epoch
    epochs: int = 10                    # passes over the training images
    batch_size: int = 128               # images per optimizer step (all processes together)
    accum_steps: int = 1                # micro-batches a step: each process's images go forward and backward in N
    #                                     parts, the gradients summed (less memory; the same update for a ViT
    #                                     without drop path or mixup; BatchNorm's statistics become a part's)
    optimizer: str = "adamw"            # adamw | lamb (LAMB: AdamW scaled per tensor by a trust ratio, for large
    #                                     batches) | muon (Muon for the blocks' weight matrices and conv
    #                                     filters, AdamW for the rest)
    lr: float = 1e-3                    # peak learning rate (Muon's scaled to AdamW's update size: one --lr for both)
    min_lr: float = 1e-5                # the lr the decay ends at (cosine, linear: just after the last step; one-cycle: at it)
    lr_schedule: str = "cosine"         # cosine | linear (warm-up, then cosine or linear decay to --min-lr) |
    #                                     one-cycle (torch's OneCycleLR: cosine from lr/25 up to --lr over the
    #                                     warm-up, cosine down to --min-lr at the last step)
    weight_decay: float = 0.05          # on the weights of linear and conv layers only
    layer_decay: float = 1.0            # layer-wise lr decay (MAE fine-tuning: 0.75): block i of L gets
    #                                     lr * decay^(L - i), what comes before the blocks decay^(L + 1)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's [beta1, beta2] (AdamW, LAMB, Muon's AdamW part), each in [0, 1)
    warmup_epochs: float = 1.0          # warm-up to --lr over this many epochs (fractions allowed)
    clip_grad: float = 1.0              # max gradient norm; 0 = off
    ema_decay: float = 0.0              # weight EMA per step; 0 = off (e.g. 0.999)
    progressive: list[int] | None = None  # progressive resizing: training image sides spread evenly over the
    #                                     epochs, e.g. [16, 24, 32] (epoch e of E at side [e * n // E]); the last
    #                                     is --img-size, which evaluation uses
    # run: where it is written, and how it runs
    out: str | None = None              # run folder (default runs/<model>-<data>-<time>)
    resume: bool = False                # continue the run in --out from its checkpoint, with its own settings
    seed: int = 0                       # seeds the weights, the data order, augmentation and dropout
    precision: str = "auto"             # auto (bf16 where native: GPUs, AMX / AVX512-BF16 CPUs) | fp32 | bf16
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 512          # images per batch when validating and testing
    eval_every: int = 1                 # validate every N epochs and after the last (0: after the last only)
    checkpoint_every: int = 0           # also checkpoint every N steps (0: at the end of each epoch only)
    progress: bool = True               # show progress: a bar on a terminal, plain periodic lines in a log
    tensorboard: bool | None = None     # TensorBoard logs in RUN/tb: unset = when tensorboard is installed,
    #                                     true = asked for (a one-line notice if it is not installed), false = off
    # speed and memory: switches that change how fast a step runs and what it keeps, not what it computes
    # (--speed.compile may be written --compile)
    speed: Speed = field(default_factory=Speed)  # speed and memory switches (--attn-backend, --compile, ...)
    # parallelism: under torchrun (engine/runtime.py), data parallel (DDP) by default
    seq_parallel: int = 1               # ranks that split each image's tokens (LSS; world = P x data-parallel D)
    seq_sharding: str = "contiguous"    # which tokens a rank holds: contiguous | strided | random (seeded)
    seq_regather: int | str | bool = "auto"  # layers gathering keys / values again in backward instead of keeping
    #                                     them: auto (the planner's: as few as keep a rank's activations within
    #                                     about 1.1/P of one device's), all (or true), none (or false), the first N
    fsdp: bool = False                  # shard weights, gradients and optimizer state (FSDP2) instead of DDP
    # locality ablations: one fixed pixel permutation of every image (data/ablations.py)
    permute_pixels: bool = False        # shuffle all pixel positions
    local_swaps: int = 0                # swaps of two pixels each, within --swap-distance (the PiT paper's T)
    swap_distance: int | None = None    # largest Chebyshev distance between two swapped pixels (1: neighbours); unset: any
    permute_seed: int = 0               # draws the permutation

    def __post_init__(self):
        """Every setting checked against its type and range: a bad one is one line naming its option,
        before any work; the task's settings by its own dataclass. (The model's are checked by `train`,
        before any data is read: a sweep's TrainConfig is the recipe of points of other models.)"""
        if isinstance(self.speed, dict):
            unknown = sorted(set(self.speed) - {f.name for f in dataclasses.fields(Speed)})
            if unknown:
                raise PixformerError(f"--speed has no setting(s) {unknown}; its settings are "
                                     f"{[f.name for f in dataclasses.fields(Speed)]}")
            self.speed = Speed(**self.speed)
        self.seq_regather = check_regather(self.seq_regather)   # (true / false, as runs saved it, are all / none)
        check_fields(self)
        check_fields(self.speed)
        self.model_args = dict(self.model_args or {})
        self.task_args = dict(self.task_args or {})
        if self.data_root:                       # saved absolute: eval / resume find it from any folder
            self.data_root = str(Path(self.data_root).expanduser().resolve())
        for name in ("epochs", "batch_size", "eval_batch_size", "max_per_pack", "seq_parallel"):
            require(name, getattr(self, name), getattr(self, name) >= 1, "at least 1")
        for name in ("img_size", "train_subset", "workers", "max_side", "max_tokens", "pack_length", "swap_distance"):
            value = getattr(self, name)
            require(name, value, value is None or value >= 1, "at least 1 (or unset)")
        for name in ("min_lr", "weight_decay", "warmup_epochs", "clip_grad", "crop_padding", "checkpoint_every",
                     "local_swaps", "loader_threads", "prefetch"):
            require(name, getattr(self, name), getattr(self, name) >= 0, "at least 0")
        for name in ("ema_decay", "token_drop"):
            require(name, getattr(self, name), 0 <= getattr(self, name) < 1, "in [0, 1)")
        require("val_fraction", self.val_fraction, 0 <= self.val_fraction < 1,
                "in [0, 1) (0 only for data with a val split of its own)")
        require("lr", self.lr, self.lr > 0, "> 0")
        require("layer_decay", self.layer_decay, 0 < self.layer_decay <= 1, "in (0, 1]")
        ra = self.rand_augment
        require("rand_augment", ra, ra is None or (ra[0] >= 0 and 0 <= ra[1] <= 30), "N M with N >= 0, 0 <= M <= 30")
        if ra is not None and self.trivial_augment:
            raise PixformerError("--rand-augment and --trivial-augment are two augmentation policies; choose one")
        require("eval_every", self.eval_every, self.eval_every >= 0, ">= 0 (epochs between validations)")
        require("random_erase", self.random_erase, 0 <= self.random_erase <= 1, "a probability in [0, 1]")
        require("accum_steps", self.accum_steps, 1 <= self.accum_steps <= self.batch_size,
                f"in [1, --batch-size {self.batch_size}] (micro-batches a step)")
        require("repeat_aug", self.repeat_aug, 1 <= self.repeat_aug <= self.batch_size,
                f"in [1, --batch-size {self.batch_size}]")
        require("betas", list(self.betas), all(0 <= b < 1 for b in self.betas), "two numbers, each in [0, 1)")
        require("optimizer", self.optimizer, self.optimizer in OPTIMIZERS, f"one of {' | '.join(OPTIMIZERS)}")
        require("lr_schedule", self.lr_schedule, self.lr_schedule in LR_SCHEDULES, f"one of {' | '.join(LR_SCHEDULES)}")
        sides = self.progressive
        if sides is not None:
            require("progressive", sides, self.img_size is not None, "given with --img-size, its last side")
            require("progressive", sides, 0 < len(sides) <= self.epochs and sides[-1] == self.img_size
                    and all(1 <= s <= self.img_size for s in sides), f"image sides ending at --img-size "
                    f"{self.img_size}, none larger, at most one per epoch ({self.epochs})")
        lo_hi = self.resolution_range
        require("resolution_range", lo_hi, lo_hi is None or 1 <= lo_hi[0] <= lo_hi[1], "LO HI with 1 <= LO <= HI")
        require("token_drop_beta", self.token_drop_beta, self.token_drop_beta is None or min(self.token_drop_beta) > 0,
                "two Beta parameters A B, each > 0")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        packing = [n for n in ("resolution_range", "pack_length", "token_drop", "token_drop_beta", "max_per_pack")
                   if getattr(self, n) != defaults[n]]
        if packing and not self.native:
            raise PixformerError(f"{', '.join(map(option, packing))} set how images are packed at native resolution, "
                                 "which is on with a budget: add --max-side or --max-tokens")
        if self.accum_steps > 1 and self.native:
            raise PixformerError("--accum-steps splits a batch of equal-size images; a packed batch at native "
                                 "resolution cannot be split: set its size with --batch-size and --pack-length")
        if self.token_drop and self.token_drop_beta is not None:
            raise PixformerError("--token-drop (one rate) and --token-drop-beta (a rate drawn per image) are two "
                                 "ways to drop tokens; choose one")
        if self.permute_pixels and self.local_swaps:
            raise PixformerError("choose one of --permute-pixels and --local-swaps (a full permutation already "
                                 "destroys what local swaps would)")
        if self.swap_distance is not None and not self.local_swaps:
            raise PixformerError(f"--swap-distance {self.swap_distance} bounds the swaps of --local-swaps, which is "
                                 "off: set --local-swaps T")
        if self.img_size is not None and self.img_size > MAX_IMG_SIZE:
            raise PixformerError(f"--img-size {self.img_size} is too large: one {self.img_size}x{self.img_size} RGB "
                                 f"image takes {3 * self.img_size ** 2 / 2 ** 30:.1f} GiB decoded; at most "
                                 f"{MAX_IMG_SIZE} (192 MiB an image)")
        task_config(self.task, self.task_args)           # the task's settings, by its own dataclass

    @classmethod
    def from_run(cls, run: str, **changes) -> "TrainConfig":
        """The settings `run` was trained with (its checkpoint's, else its config.json), with `changes`:
        `pixformer.train(TrainConfig.from_run("runs/x", resume=True))` continues a stopped run as
        `pixformer train --out runs/x --resume` does."""
        saved = saved_settings(run)
        if saved is None:
            raise PixformerError(f"{run} holds no run (no checkpoint/ and no config.json)")
        return config_from_options(resume_options(saved, {"out": str(run), **changes}))

    @property
    def native(self) -> bool:
        """Whether images keep their own sizes (a --max-side or --max-tokens budget is set)."""
        return is_native(vars(self))


# Settings that change how a run executes but not what it computes (beyond float rounding, the batches
# BatchNorm normalises over in micro-batches, and the draws made per process or micro-batch: which
# images mixup / CutMix pair, dropout and drop-path masks): a run may be resumed, or a cached sweep
# point reused, with these changed; any other change is refused.
RUN_ONLY = ("out", "resume", "progress", "tensorboard", "device", "eval_batch_size", "checkpoint_every", "data_root", "speed",
            "accum_steps", "seq_parallel", "seq_sharding", "seq_regather", "fsdp", "workers", "loader_threads", "prefetch")


def as_json(cfg: TrainConfig) -> dict[str, Any]:
    """The config as stored in state.json and config.json (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def changed_settings(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """'name: old -> new' for each setting (outside RUN_ONLY) in which `cfg` differs from a saved config;
    a setting the saved config lacks (a run of an earlier version, before the setting existed) counts
    as its default, what that run computed with."""
    new, old = as_json(cfg), {**as_json(TrainConfig()), **saved}
    new["data"], old["data"] = source_id(new["data"]), source_id(old["data"])     # a path, however written
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
            if k not in RUN_ONLY and old.get(k) != new.get(k)]


class Shortcut(NamedTuple):
    """A flat option for a field of the model or task dataclasses (`--depth` for model_args.depth)."""
    mapping: str            # model_args | task_args
    hint: Any               # the field's type
    help: str               # its comment, with the models / tasks that have it when not all do


def setting_shortcuts() -> dict[str, Shortcut]:
    """The flat options for the fields of the model and task dataclasses (`--depth` for
    model_args.depth, `--mixup` for task_args.mixup), by name; the help is the owners' comment, or where
    their comments differ each owner's, named."""
    out: dict[str, Shortcut] = {}
    for mapping, owners in (("model_args", {a: ARCHITECTURES[a][0] for a in NAMED}),
                            ("task_args", {t: task.Config for t, task in TASKS.items()})):
        have: dict[str, dict[str, str]] = {}                  # name -> {owner: its help}
        for owner, cls in owners.items():
            hints, docs = typing.get_type_hints(cls), field_docs(cls)
            for f in dataclasses.fields(cls):
                if (mapping == "model_args" and f.name in DATA_FIELDS) or out.get(f.name, (mapping,))[0] != mapping:
                    continue                       # set by the data; or a model setting's name: the model's
                if f.name not in out:
                    out[f.name] = Shortcut(mapping, hints[f.name], "")
                have.setdefault(f.name, {})[owner] = help_text(f.name, docs[f.name].help)
        for name, helps in have.items():
            if len(set(helps.values())) > 1:
                text = "; ".join(f"{owner}: {h}" for owner, h in helps.items())
            else:
                text = next(iter(helps.values())) + (f" [{', '.join(helps)}]" if len(helps) < len(owners) else "")
            out[name] = out[name]._replace(help=text)
    return out


def choices() -> dict[str, list[str]]:
    """The values of the settings whose values the code lists (the help names each of them)."""
    from ..models.attention import available_backends
    return {"task": sorted(TASKS), "precision": ["auto", "fp32", "bf16"], "attn_backend": available_backends(),
            "allocator": list(ALLOCATOR_POLICIES), "seq_sharding": ["contiguous", "strided", "random"],
            "optimizer": list(OPTIMIZERS), "lr_schedule": list(LR_SCHEDULES),
            **{name: list(values) for task in TASKS.values() for name, values in task.choices.items()}}


def help_text(name: str, comment: str) -> str:
    """A setting's help: its comment, and the values it takes where the comment does not name them all."""
    values = choices().get(name, [])
    if any(v not in comment for v in values):
        comment = f"{comment} (one of: {' | '.join(values)})".strip()
    return comment


def config_from_options(values: dict[str, Any], skip: set[str] = frozenset()) -> TrainConfig:
    """A TrainConfig from flat options (the command line's): TrainConfig fields, less `skip`, with each
    shortcut merged into its mapping (a shortcut wins over the same key given in the mapping)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(skip)
    kw = {k: values[k] for k in fields if k in values}
    for name, shortcut in setting_shortcuts().items():
        if values.get(name) is not None and name not in skip:
            kw[shortcut.mapping] = {**(kw.get(shortcut.mapping) or {}), name: values[name]}
    if hasattr(kw.get("speed"), "keys") and not isinstance(kw["speed"], dict):   # a parser's namespace
        kw["speed"] = dict(kw["speed"])
    return TrainConfig(**kw)


def saved_settings(run: str | Path) -> dict[str, Any] | None:
    """The settings a run folder was trained with: its checkpoint's (state.json), else its config.json
    (a run stopped before its first checkpoint); None when it holds neither."""
    from .checkpoint import find_checkpoint, read_state
    ckpt = find_checkpoint(run)
    if ckpt is not None:
        return read_state(ckpt)["train_config"]
    path = Path(run) / "config.json"
    if not path.is_file():
        return None
    from ..files import read_json_object
    return read_json_object(path, "a run's settings")


def resume_options(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The options of a resumed run: its saved settings, with the options `given` explicitly over them
    (a speed switch given changes that switch alone). `train` then refuses a given option that changes
    what the run computes (outside RUN_ONLY), naming it."""
    known = {f.name for f in dataclasses.fields(Speed)}          # (a switch of another version: dropped)
    speed = {k: v for k, v in {**(saved.get("speed") or {}), **(given.get("speed") or {})}.items() if k in known}
    return {**saved, **given, "speed": speed}


def init_options(values: dict[str, Any], given: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """With --init naming a pixformer run and no --model given: the options with that run's architecture
    (an MAE or probe run's encoder) as --model and --model-args, the model settings given over it; and
    a line saying so (None when nothing was taken)."""
    from .checkpoint import find_checkpoint, read_state
    init = values.get("init")
    ckpt = find_checkpoint(init) if init and "model" not in given else None
    if ckpt is None:
        return values, None
    state = read_state(ckpt)
    name, args = architecture(state["model"], (state.get("train_config") or {}).get("model"))
    args = {**args, **(given.get("model_args") or {})}
    return {**values, "model": name, "model_args": args}, f"--model {name} --model-args {json.dumps(args)} (the " \
        f"architecture of --init {init}; give --model to choose another)"
