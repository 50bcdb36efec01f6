"""A task is what differs between training objectives; the engine (engine/loop.py) owns what they share.

The engine calls, for a run:
    task = TaskClass(settings, facts)          # settings: the task's own dataclass; facts: the data's
    model = task.build_model(name, model_args) # the module trained (and checkpointed)
    loss, stats = task.loss(model, images, labels, rng)   # each step, under autocast
    sums = task.eval_sums(model, images, labels, rng)     # each evaluation batch, without grad
    metrics = task.metrics(sums)               # after the sums of every batch (and process) are added
    task.report(model, val_images, run_dir, epoch)        # after each validation: figures, if the task has any

`images` arrive on the device, augmented (crop, flip) and normalised; `labels` are class indices.
`stats` and `sums` are sums over the batch's examples with their count under "n", so that the engine
can add them over steps, batches and processes before dividing; `rng` (numpy, seeded by the run's
seed and step, or by the batch's index in evaluation) draws whatever the task randomises, so a
resumed run redraws the same and every evaluation of a model gives the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..errors import PixformerError
from ..models.registry import resolve


@dataclass
class DataFacts:
    """What a task and a checkpoint know of the data: class names, channels, training image size,
    and the per-channel normalisation computed on the training images."""
    classes: list[str]
    in_chans: int
    img_size: tuple[int, int]
    mean: list[float]
    std: list[float]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataFacts":
        """The facts from a checkpoint's "data" record (which holds more)."""
        return cls(d["classes"], d["in_chans"], tuple(d["img_size"]), d["mean"], d["std"])


class Task:
    name: str                     # --task NAME
    Config: type                  # the task's settings dataclass (--task-args, or its shortcuts)
    best: tuple[str, str]         # (validation metric that marks the best epoch, "max" or "min")
    uses_labels: bool = True      # False: labels are ignored (eval then accepts any class names)
    needs_init: bool = False      # True: the run must start from a trained run (--init)

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

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor,
             rng: np.random.Generator) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, images: Tensor, labels: Tensor,
                  rng: np.random.Generator) -> dict[str, float]:
        raise NotImplementedError

    def report(self, model: nn.Module, data: Any, run_dir: Path, epoch: int) -> Path | None:
        """Write the task's figures of an epoch (the validation split `data`) under `run_dir`; none by default."""
        return None

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Means of the summed statistics, and the example count "n"."""
        n = max(sums.get("n", 0), 1)
        return {**{k: v / n for k, v in sums.items() if k != "n"}, "n": int(sums.get("n", 0))}
