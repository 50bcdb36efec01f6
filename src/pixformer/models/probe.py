"""A linear probe (MAE's recipe): a frozen ViT encoder, always in eval mode, whose class token or
mean patch token goes through a BatchNorm without affine parameters and one linear layer. Only
the BatchNorm statistics and the linear layer learn."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PixformerError
from .vit import ViTConfig, VisionTransformer

FEATURES = ("auto", "cls", "mean")      # what a probe reads: the encoder's own pooling, its class token, the mean


@dataclass
class ProbeModelConfig:
    encoder: dict[str, Any] = field(default_factory=dict)   # ViTConfig fields (num_classes is 0)
    num_classes: int = 10               # classes of the linear layer (set by the data)
    features: str = "auto"              # cls | mean | auto (the class token if the encoder has one)

    def __post_init__(self):
        self.encoder = {**self.encoder, "num_classes": 0}
        if self.features not in FEATURES:
            raise PixformerError(f"probe features must be {', '.join(FEATURES)}, got {self.features!r}")
        if self.features == "cls" and self.encoder.get("pool", "cls") != "cls":
            raise PixformerError("probe features 'cls' need an encoder with a class token (pool='cls')")


class LinearProbe(nn.Module):
    def __init__(self, cfg: ProbeModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(ViTConfig(**cfg.encoder)).requires_grad_(False)
        D = self.encoder.cfg.dim
        self.bn = nn.BatchNorm1d(D, affine=False, eps=1e-6)
        self.head = nn.Linear(D, cfg.num_classes)
        self.init_weights()

    def init_weights(self):
        """The head as the MAE probe initialises it; the encoder keeps what it was built or loaded with."""
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()                                    # frozen: no dropout, no drop-path, ever
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            tokens, _ = self.encoder.embed(images)                                  # (B, N, D)
            feats = self.encoder.encode(self.encoder.prepend_cls(tokens))           # (B, T, D)
            how = None if self.cfg.features == "auto" else self.cfg.features       # auto: the encoder's own
            pooled = self.encoder.pool(feats, how)                                  # (B, D)
        return self.head(self.bn(pooled.float()))                                   # (B, classes)
