"""Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021) around
pixformer's ViT, at any patch size: at patch 1 every visible pixel is a token (the PiT paper's MAE).

The model computes; the MAE task (tasks/mae.py) chooses which tokens are visible and owns the loss:

    pred = model(images, keep)     # keep (B, K): indices of the visible tokens of each image
                                   # pred (B, N, p*p*C): a prediction of every token's patch

    encoder   pixformer's VisionTransformer (no head): the visible tokens with their own position
              embeddings (and the class token, if the encoder has one) through its blocks
    decoder   a linear map to the decoder width, a learned mask token at every hidden position, a
              fixed 2-D sincos position embedding (computed for any grid), `Block`s, a norm, and a
              linear prediction of each token's p*p*C values
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PixformerError
from ..layout import grid_coords
from ..settings import require
from .pos_embed import sincos_2d
from .vit import Block, ViTConfig, VisionTransformer, init_transformer

# Decoder sizes by encoder size letter: (depth, width, heads). b and l are the MAE reference's
# (8 blocks of width 512, 16 heads); the smaller ones scale it down with the encoder.
DECODER_SIZES: dict[str, dict[str, int]] = {
    "n": dict(decoder_depth=2, decoder_dim=64, decoder_heads=4),
    "t": dict(decoder_depth=4, decoder_dim=128, decoder_heads=4),
    "s": dict(decoder_depth=4, decoder_dim=256, decoder_heads=8),
    "b": dict(decoder_depth=8, decoder_dim=512, decoder_heads=16),
    "l": dict(decoder_depth=8, decoder_dim=512, decoder_heads=16),
}


@dataclass
class MAEConfig:
    encoder: dict[str, Any] = field(default_factory=dict)   # ViTConfig fields (num_classes is 0)
    decoder_depth: int = 8              # the decoder's Transformer blocks (trained, then thrown away)
    decoder_dim: int = 512              # the decoder's width
    decoder_heads: int = 16             # the decoder's attention heads (dividing its width)
    decoder_mlp_ratio: float = 4.0      # the decoder's MLP hidden width / its width

    def __post_init__(self):
        self.encoder = {**self.encoder, "num_classes": 0}
        for name in ("decoder_dim", "decoder_heads"):
            require(name, getattr(self, name), getattr(self, name) >= 1, "at least 1")
        require("decoder_depth", self.decoder_depth, self.decoder_depth >= 0, "at least 0")
        require("decoder_mlp_ratio", self.decoder_mlp_ratio, self.decoder_mlp_ratio > 0, "> 0")
        if self.decoder_dim % self.decoder_heads:
            raise PixformerError(f"decoder width {self.decoder_dim} is not divisible by {self.decoder_heads} heads")
        if self.decoder_dim % 4:
            raise PixformerError(f"the decoder's sincos position embedding needs a width divisible by 4, "
                                 f"got {self.decoder_dim}")


class MaskedAutoencoder(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(ViTConfig(**cfg.encoder))
        e, Dd = self.encoder.cfg, cfg.decoder_dim
        self.decoder_embed = nn.Linear(e.dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_blocks = nn.ModuleList(Block(Dd, cfg.decoder_heads, cfg.decoder_mlp_ratio)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, e.patch_size ** 2 * e.in_chans)
        self.init_weights()

    def init_weights(self):
        """The Transformer's initialisation for the decoder and the mask token (normal, std 0.02) as in the
        MAE reference; the encoder keeps its own (its constructor's `init_weights`) or what it is loaded with."""
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_transformer(part)
        nn.init.normal_(self.mask_token, std=0.02)

    def decoder_position(self, grid: tuple[int, int]) -> Tensor:
        """(N, Dd) fixed sincos embedding of every token of `grid` (any size: nothing is learned)."""
        coords = grid_coords(*grid, device=self.mask_token.device)
        return sincos_2d(coords, self.cfg.decoder_dim)

    def forward(self, images: Tensor, keep: Tensor) -> Tensor:
        """images (B, C, H, W), keep (B, K) visible token indices -> (B, N, p*p*C) predicted patches."""
        tokens, grid = self.encoder.embed(images)                             # (B, N, D)
        B, N, D = tokens.shape
        K = keep.shape[1]
        visible = tokens.gather(1, keep[..., None].expand(-1, -1, D))         # (B, K, D)
        latent = self.encoder.encode(self.encoder.prepend_cls(visible))       # (B, T, D), T = K (+1 class token)
        x = self.decoder_embed(latent).to(self.mask_token.dtype)              # (B, T, Dd): fp32 under autocast
        prefix, Dd = x.shape[1] - K, x.shape[2]
        full = self.mask_token.to(x.dtype).expand(B, N, Dd).scatter(1, keep[..., None].expand(-1, -1, Dd), x[:, prefix:])
        full = full + self.decoder_position(grid).to(x.dtype)                 # (B, N, Dd): every token in place
        x = torch.cat([x[:, :prefix], full], dim=1)                           # (B, prefix + N, Dd)
        for block in self.decoder_blocks:
            x = block(x)                                                      # (B, prefix + N, Dd)
        return self.decoder_pred(self.decoder_norm(x[:, prefix:]))            # (B, N, p*p*C): a new tensor, no view


def visible_count(n: int, mask_ratio: float) -> int:
    """Tokens kept visible out of `n` at `mask_ratio`: floor(n * (1 - ratio)), as in MAE; at least one."""
    if not 0 < mask_ratio < 1:
        raise PixformerError(f"mask ratio must be between 0 and 1 (exclusive), got {mask_ratio}")
    k = int(n * (1 - mask_ratio))
    if k < 1:
        raise PixformerError(f"mask ratio {mask_ratio} leaves no visible token of {n}; lower --mask-ratio")
    return k


def random_keep(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-image random masking, driven by `noise` (B, N): the tokens with the smallest noise
    stay visible. Returns keep (B, K) visible indices, mask (B, N) with 1 = hidden, and restore
    (B, N), the permutation that undoes the shuffle (argsort of argsort)."""
    B, N = noise.shape
    k = visible_count(N, mask_ratio)
    shuffle = noise.argsort(dim=1)                                            # (B, N) ascending noise
    restore = shuffle.argsort(dim=1)                                          # (B, N)
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :k] = 0
    return shuffle[:, :k], mask.gather(1, restore), restore
