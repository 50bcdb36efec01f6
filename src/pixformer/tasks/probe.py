"""Linear probing: how linearly separable a pretrained encoder's features are (models/probe.py).
Classification on a frozen encoder started from `--init RUN`; its loss and metrics are classify's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import PixformerError
from ..models.probe import LinearProbe, ProbeModelConfig
from ..models.registry import resolve
from .classify import Classify, ClassifyConfig


@dataclass
class ProbeConfig(ClassifyConfig):
    label_smoothing: float = 0.0        # the MAE probe recipe: plain cross-entropy
    features: str = "auto"              # cls | mean | auto (the class token if the encoder has one)


class Probe(Classify):
    name = "probe"
    Config = ProbeConfig
    needs_init = True

    def build_model(self, name: str, model_args: dict[str, Any]) -> nn.Module:
        arch, fields = resolve(name)
        if arch != "vit":
            raise PixformerError(f"a linear probe needs a ViT encoder (vit-*/p or pit-*); {name} is a {arch}")
        f = self.facts
        encoder = {**fields, **model_args, "img_size": f.img_size, "in_chans": f.in_chans}
        return LinearProbe(ProbeModelConfig(encoder=encoder, num_classes=len(f.classes), features=self.cfg.features))
