"""A task is what differs between training objectives; the engine (engine/loop.py) owns what they share.

The engine calls, for a run:
    task = TaskClass(settings, facts)          # settings: the task's own dataclass; facts: the data's
    split = task.prepare(split)                # once per split (default: as it is; latents for latent diffusion)
    model = task.build_model(name, model_args) # the module trained (and checkpointed)
    x = task.inputs(images)                    # each batch, after crop and flip (default: normalised)
    loss, stats = task.loss(model, x, labels, rng)        # each step, under autocast
    sums = task.eval_sums(model, x, labels, rng)          # each evaluation batch, without grad
    metrics = task.metrics(sums)               # after the sums of every batch (and process) are added
    task.report(model, val_images, run_dir, epoch)        # after each validation: figures, if the task has any

Batches arrive on the device, augmented (crop, flip) and made inputs `x` by `task.inputs`; `labels`
are class indices. `stats` and `sums` are sums over the batch's examples with their count under "n", so that the engine
can add them over steps, batches and processes before dividing; `rng` draws whatever the task randomises:
in training the numpy Generator methods of a `RankRandom` (engine/runtime.py) seeded by the run's seed
and step (a resumed run redraws the same; per-image draws are made for the global batch and this
process's rows kept), in evaluation an `ExampleRandom` that draws each example's numbers from its own
index in the split, so an evaluation gives the same numbers whatever the batch size (or the number of
processes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..data.augment import normalize
from ..data.store import ImageSet
from ..errors import PixformerError
from ..models.registry import resolve


@dataclass
class DataFacts:
    """What a task and a checkpoint know of the data: class names, channels, training image size,
    and the per-channel normalisation computed on the training images."""
    classes: list[str]            # class names, in label order
    in_chans: int                 # channels of an image (1 or 3)
    img_size: tuple[int, int]     # (H, W) the model is built for (native resolution: its position table's square)
    mean: list[float]             # per-channel mean of the training images, on the 0..1 scale
    std: list[float]              # per-channel standard deviation, on the 0..1 scale

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataFacts":
        """The facts from a checkpoint's "data" record (which holds more)."""
        return cls(d["classes"], d["in_chans"], tuple(d["img_size"]), d["mean"], d["std"])


class ExampleRandom:
    """The part of numpy's Generator API the tasks use, drawn per example: row b of every draw comes
    from a generator seeded by the index of example b in its split. Shapes are the batch's (B, ...)."""

    def __init__(self, indices):
        self.indices, self._gens = list(indices), None

    @property
    def gens(self) -> list[np.random.Generator]:
        if self._gens is None:                 # made at the first draw: a task that draws nothing pays nothing
            self._gens = [np.random.default_rng([0, int(k)]) for k in self.indices]
        return self._gens

    def _each(self, shape, draw):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if shape[0] != len(self.indices):
            raise ValueError(f"a draw of shape {shape} for a batch of {len(self.indices)} examples")
        return np.stack([draw(g, shape[1:]) for g in self.gens])

    def random(self, shape):
        return self._each(shape, lambda g, s: g.random(s))

    def standard_normal(self, shape, dtype=np.float64):
        return self._each(shape, lambda g, s: g.standard_normal(s, dtype=dtype))

    def integers(self, low, high, shape):
        return self._each(shape, lambda g, s: g.integers(low, high, s))


class Task:
    name: str                     # --task NAME
    Config: type                  # the task's settings dataclass (--task-args, or its shortcuts)
    best: tuple[str, str]         # (validation metric that marks the best epoch, "max" or "min")
    uses_labels: bool = True      # False: labels are ignored (eval then accepts any class names)
    shown_as: dict[str, str] = {}  # validation metrics' names on the epoch line, where the key alone misleads
    needs_init: bool = False      # True: the run must start from a trained run (--init)
    fresh_on_init: tuple[str, ...] = ()   # its model's weights (name prefixes) --init never loads: they start new
    min_classes: int = 0          # classes the data must have (a classifier: 2), checked before decoding
    architectures: tuple[str, ...] = ()   # the model families it trains (registry names: vit, convmixer, dit)
    packs: tuple[str, ...] = ()           # those it trains on packed images of any sizes (native resolution)
    splits_tokens: tuple[str, ...] = ()   # those whose images' tokens it can split over ranks (--seq-parallel)
    embeds_subsets: bool = False          # embeds a subset of each image's patches (MAE's visible ones)
    choices: dict[str, tuple[str, ...]] = {}   # the values of its settings that take one of a list (their help names them)

    def __init__(self, cfg: Any, facts: DataFacts):
        self.cfg = cfg
        self.facts = facts

    def build_model(self, name: str, model_args: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def vit_encoder(self, name: str, model_args: dict[str, Any]) -> dict[str, Any]:
        """ViTConfig fields of the encoder that `name` and `model_args` give for this data, for tasks
        that wrap a ViT (MAE, the probe); a name of another architecture is refused."""
        arch, fields = resolve(name)
        if arch != "vit":
            raise PixformerError(f"--task {self.name} needs a ViT encoder (vit-*/p or pit-*); {name} is a {arch}")
        return {**fields, **model_args, "img_size": self.facts.img_size, "in_chans": self.facts.in_chans}

    @classmethod
    def check_tokens(cls, tokens: int, cfg: Any) -> None:
        """A clear error if images of `tokens` tokens cannot train under the task's settings `cfg`
        (checked before any data is read, for progressive resizing's smallest side); any can by default."""

    @classmethod
    def check_native(cls, cfg: Any) -> None:
        """A clear error for settings `cfg` that need square images of one size, where a run packs images
        at their native resolution; any can by default."""

    @classmethod
    def encoded(cls, cfg: Any) -> str | None:
        """Why the model trains on an encoding of the images rather than their pixels under the settings
        `cfg`, which then can neither change size during a run (--progressive) nor take the pixel
        augmentations (crop padding, RandAugment, TrivialAugment, random erasing); None: the pixels (the default)."""
        return None

    def model_space(self) -> tuple[tuple[int, int], int]:
        """The image size and channels the model sees: the data's (a latent diffusion task's: its latents')."""
        return tuple(self.facts.img_size), self.facts.in_chans

    def block_tokens(self, model: nn.Module) -> list[int] | None:
        """Each block's sequence length in a training step (blocks_of order), where the blocks do not all
        see the tokens of the whole image (MAE); None: they do, and the planner counts them by name."""
        return None

    def prepare(self, data: ImageSet) -> ImageSet:
        """A split as the task trains on it, once per split before the model is built (train, eval):
        by default the uint8 images as they are (a latent diffusion task encodes them)."""
        return data

    def inputs(self, images: Tensor) -> Tensor:
        """A batch of the prepared split (after crop and flip) -> what `loss` and `eval_sums` get:
        by default uint8 images -> floats standardised per channel."""
        return normalize(images, self.facts.mean, self.facts.std)

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor,
             rng: np.random.Generator) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, images: Tensor, labels: Tensor,
                  rng: np.random.Generator) -> dict[str, float]:
        raise NotImplementedError

    def report(self, model: nn.Module, data: Any, run_dir: Path | None, epoch: int) -> Path | None:
        """Write the task's figures of an epoch (the validation split `data`) under `run_dir`; none by default.
        With `run_dir` None, run the same forwards and write nothing (the other ranks of a sharded model:
        FSDP2 gathers the weights of each forward from every rank)."""
        return None

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Means of the summed statistics, and the example count "n"."""
        n = max(sums.get("n", 0), 1)
        return {**{k: v / n for k, v in sums.items() if k != "n"}, "n": int(sums.get("n", 0))}
