"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023) on
pixformer's trunk, at any patch size: patch 1 is the PiT paper's generation model (one token per
pixel, or per cell of a VAE's latent grid), larger patches are DiT-S/2, DiT-L/2 and so on.

    out = model(x_t, t, y)    # x_t (B, C, H, W) noisy images, t (B,) timesteps, y (B,) class indices
                              # (index num_classes is the "null" class of classifier-free guidance)
                              # out (B, C, H, W) predicted noise, or (B, 2C, H, W) with learn_sigma
                              # (the second half: the interpolation v of the learned variance);
                              # what the output means (noise, velocity or image) is the task's --prediction

The blocks are the package's one `Block` in its adaLN-Zero form (models/vit.py); the conditioning
vector is the timestep embedding (a 256-frequency sinusoid through an MLP) plus the class embedding.
The position embedding is the fixed 2-D sincos of the token coordinates, so any image size (square
or not) works without a table. The model computes; noise, schedules, losses and samplers belong to
the diffusion task (tasks/diffusion.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import PixformerError
from ..layout import check_grid, check_images, grid_coords, patchify, unpatchify
from ..settings import check_fields, require, square
from .pos_embed import sincos_2d
from .vit import Block, ModulatedLayerNorm, block_flops, conditioning_map, init_transformer


@dataclass
class DiTConfig:
    img_size: tuple[int, int] = (32, 32)  # size trained at (any other size also runs: sincos positions)
    patch_size: int = 2                   # 1 = one token per pixel / latent cell (PiT)
    in_chans: int = 4                     # image (or latent) channels (set by the data)
    num_classes: int = 1000               # 0 = unconditional; index num_classes is the null class
    depth: int = 28                       # Transformer blocks
    dim: int = 1152                       # width: features per token
    heads: int = 16                       # attention heads (dividing the width)
    mlp_ratio: float = 4.0                # MLP hidden width / width
    learn_sigma: bool = False             # also predict the variance (DiT's hybrid loss), 2C outputs
    freq_dim: int = 256                   # sinusoid frequencies of the timestep embedding
    embed_rank: int = 0                   # JiT's bottleneck patch embedding: p*p*C -> r -> D, a low-rank linear
                                          # pair (0: one linear map p*p*C -> D)

    def __post_init__(self):
        self.img_size = square(self.img_size)
        check_fields(self)                                          # every field its type, in one line if not
        for name in ("patch_size", "dim", "heads", "freq_dim"):
            require(name, getattr(self, name), getattr(self, name) >= 1, "at least 1")
        require("embed_rank", self.embed_rank, self.embed_rank >= 0, "at least 0 (0: no bottleneck)")
        require("depth", self.depth, self.depth >= 0, "at least 0")
        require("in_chans", self.in_chans, self.in_chans >= 1, "at least 1")
        require("num_classes", self.num_classes, self.num_classes >= 0, "at least 0 (0: unconditional)")
        require("mlp_ratio", self.mlp_ratio, self.mlp_ratio > 0, "> 0")
        if self.dim % self.heads:
            raise PixformerError(f"width {self.dim} is not divisible by {self.heads} heads")
        if self.dim % 4:
            raise PixformerError(f"the sincos position embedding needs a width divisible by 4, got {self.dim}")
        if self.freq_dim % 2:
            raise PixformerError(f"freq_dim must be even, got {self.freq_dim}")
        check_grid(self.img_size, self.patch_size)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps (may be fractional) -> (B, dim) sinusoid [cos(t f_i), sin(t f_i)] with
    f_i = max_period^(-i / (dim / 2)), i < dim / 2: DiT's (and ADM's) timestep features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                              # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)          # (B, dim)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        p, D, C = cfg.patch_size, cfg.dim, cfg.in_chans
        self.out_chans = 2 * C if cfg.learn_sigma else C
        if cfg.embed_rank:                                                # JiT: p*p*C -> r (no bias) -> D
            self.patch_embed = nn.Sequential(nn.Linear(C * p * p, cfg.embed_rank, bias=False),
                                             nn.Linear(cfg.embed_rank, D))
        else:
            self.patch_embed = nn.Linear(C * p * p, D)                   # p = 1: a map of one pixel's channels
        self.t_embed = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None   # + the null class
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cond_dim=D) for _ in range(cfg.depth))
        self.final_norm = ModulatedLayerNorm(1e-6)
        self.final_modulation = nn.Linear(D, 2 * D)                      # shift, scale of the last norm
        self.final_linear = nn.Linear(D, p * p * self.out_chans)
        self.init_weights()

    def init_weights(self):
        """All initialisation in one place: the Transformer's (init_transformer, which zeroes every
        block's adaLN modulation), normal (std 0.02) class and timestep embeddings as in DiT, and a
        zero final modulation and output layer, so every block starts as the identity and the
        model's output is zero."""
        init_transformer(self)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for m in self.t_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in (self.final_modulation, self.final_linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(N, D) fixed sincos embedding of every token of `grid` (row-major), for any grid."""
        return sincos_2d(grid_coords(*grid, device=self.t_embed[0].weight.device), self.cfg.dim)

    def condition(self, t: Tensor, y: Tensor | None) -> Tensor:
        """(B,) timesteps and (B,) class indices (or None) -> (B, D) conditioning vector."""
        c = self.t_embed(timestep_embedding(t, self.cfg.freq_dim).to(self.t_embed[0].weight.dtype))   # (B, D)
        if self.y_embed is None:
            if y is not None:
                raise PixformerError("this model is unconditional: it takes no class labels")
            return c
        if y is None:
            raise PixformerError(f"this model is class-conditional: pass labels in 0..{self.cfg.num_classes} "
                                 f"({self.cfg.num_classes} = no class)")
        return c + self.y_embed(y)                                        # (B, D)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        p = self.cfg.patch_size
        patches, grid = patchify(check_images(x, self.cfg.in_chans), p)   # (B, N, p*p*C)
        stream = self.t_embed[0].weight.dtype                             # the residual stream: fp32 under autocast
        h = self.patch_embed(patches) + self.position_embedding(grid).to(stream)  # (B, N, D)
        c = self.condition(t, y)                                          # (B, D)
        for block in self.blocks:
            h = block(h, None, c)                                         # (B, N, D)
        shift, scale = conditioning_map(self.final_modulation, c, h.dtype)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        h = self.final_norm(h, shift, scale)                              # (B, N, D)
        out = self.final_linear(h)                                        # (B, N, p*p*out_chans)
        return unpatchify(out, p, grid)                                   # (B, out_chans, H, W)

    def flops(self, img_size: tuple[int, int] | None = None) -> int:
        """Forward FLOPs for one image (a multiply-add counts as 2), matmuls of the token path only."""
        c = self.cfg
        gh, gw = check_grid(img_size or c.img_size, c.patch_size)
        n, hidden = gh * gw, int(c.dim * c.mlp_ratio)
        per_block = block_flops(n, c.dim, hidden)
        pixels = c.patch_size ** 2
        r = c.embed_rank
        embed = pixels * c.in_chans * r + r * c.dim if r else pixels * c.in_chans * c.dim   # the bottleneck's pair
        io = 2 * n * (embed + pixels * self.out_chans * c.dim)
        return io + c.depth * per_block
