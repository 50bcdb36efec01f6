"""Supervised classification: soft-target cross-entropy (label smoothing, mixup / CutMix), top-1 and
top-5 accuracy. The model is any registered architecture with a classifier head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import mix
from ..errors import PixformerError
from ..models.registry import create_model
from ..settings import check_fields
from .base import Task


@dataclass
class ClassifyConfig:
    label_smoothing: float = 0.1        # weight moved from the true class to a uniform target
    mixup: float = 0.0                  # mixup Beta alpha; 0 = off
    cutmix: float = 0.0                 # CutMix Beta alpha; 0 = off (with both on, one is drawn per batch)
    eval_flip: bool = False             # evaluate each image and its mirror image, averaging the two logits

    def __post_init__(self):
        check_fields(self)                                          # types; every float finite
        if not 0 <= self.label_smoothing < 1:
            raise PixformerError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise PixformerError(f"mixup and cutmix are Beta alphas >= 0 (0 = off), got {self.mixup}, {self.cutmix}")


class Classify(Task):
    name = "classify"
    Config = ClassifyConfig
    best = ("top1", "max")
    min_classes = 2
    architectures = ("vit", "convmixer")
    packs = ("vit",)
    splits_tokens = ("vit",)

    @classmethod
    def check_native(cls, cfg: ClassifyConfig) -> None:
        if cfg.mixup or cfg.cutmix:
            raise PixformerError("mixup and CutMix mix images of one size; turn them off at native resolution")
        if cfg.eval_flip:
            raise PixformerError("--eval-flip mirrors square evaluation batches; turn it off at native resolution")

    def build_model(self, name: str, model_args: dict[str, Any]) -> nn.Module:
        f = self.facts
        return create_model(name, img_size=f.img_size, num_classes=len(f.classes), in_chans=f.in_chans, **model_args)

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor,
             rng: np.random.Generator) -> tuple[Tensor, dict[str, float]]:
        K, ls = len(self.facts.classes), self.cfg.label_smoothing
        target = F.one_hot(labels, K).float() * (1 - ls) + ls / K              # (B, K)
        images, target = mix(images, target, self.cfg.mixup, self.cfg.cutmix, rng)
        logits = model(images).float()                                         # (B, K)
        loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        n = len(labels)
        return loss, {"n": n, "loss": loss.item() * n, "acc": (logits.argmax(1) == labels).sum().item()}

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The model as evaluation scores it (and predict and the ONNX export run it): itself, or with
        --eval-flip averaged with its mirror image (MirrorAveraged)."""
        return MirrorAveraged(model) if self.cfg.eval_flip else model

    def eval_sums(self, model: nn.Module, images: Tensor, labels: Tensor,
                  rng: np.random.Generator) -> dict[str, float]:
        logits = self.evaluated(model)(images).float()                         # (B, K)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices              # (B, 5)
        return {"n": len(labels), "loss": F.cross_entropy(logits, labels, reduction="sum").item(),
                "top1": (top[:, 0] == labels).sum().item(), "top5": (top == labels[:, None]).any(1).sum().item()}


class MirrorAveraged(nn.Module):
    """Test-time augmentation: a classifier's logits of the images and of their mirror images
    (flipped left to right), averaged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:                       # x: (B, C, H, W)
        return (self.model(x).float() + self.model(x.flip(-1)).float()) / 2     # (B, K)
