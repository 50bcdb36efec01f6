"""Linear probing: how linearly separable a pretrained encoder's features are (models/probe.py).
Classification on a frozen encoder started from `--init RUN`; its loss and metrics are classify's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..models.probe import FEATURES, LinearProbe, ProbeModelConfig
from ..settings import require
from .classify import Classify, ClassifyConfig


@dataclass
class ProbeConfig(ClassifyConfig):
    label_smoothing: float = 0.0        # the MAE probe recipe: plain cross-entropy
    features: str = "auto"              # cls | mean | auto (the class token if the encoder has one)

    def __post_init__(self):
        super().__post_init__()
        require("features", self.features, self.features in FEATURES, ", ".join(FEATURES))


class Probe(Classify):
    name = "probe"
    Config = ProbeConfig
    needs_init = True
    fresh_on_init = ("bn.", "head.")     # a probe trains its own head, also on a classifier's encoder
    architectures = ("vit",)
    packs = ()
    splits_tokens = ()

    def build_model(self, name: str, model_args: dict[str, Any]) -> nn.Module:
        return LinearProbe(ProbeModelConfig(encoder=self.vit_encoder(name, model_args),
                                            num_classes=len(self.facts.classes), features=self.cfg.features))
