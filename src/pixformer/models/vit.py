"""Vision Transformer at any patch size. Patch size 1 is the Pixel Transformer (PiT) of
"An Image is Worth More Than 16x16 Patches" (arXiv 2406.09415): one token per pixel, each a
linear map of the pixel's channels. Larger patch sizes give ViT ("An Image is Worth 16x16 Words").

Classification, MAE, the linear probe and sequence parallelism use the encoder through these steps:
    tokens, grid = model.embed(images)      # (B, N, D) patch tokens with position added
    x = model.prepend_cls(tokens)           # (B, T, D), T = N + 1 with a class token (an explicit step)
    feats = model.encode(x, spec)           # (B, T, D) after the blocks and final norm
    pooled = model.pool(feats)              # (B, D)
    logits = model.head(pooled)             # (B, classes)

Images of different sizes travel packed into shared sequences (`pixformer.layout.Packed`, NaViT):
`model(packed)` embeds each token at its coordinates, attends within each image (segment ids) and
pools per image. Whole images, packs and sequence-parallel shards are all embedded by one step,
`embed_tokens(patches, grid, coords)` (with the linear stem; the convolutional stem embeds whole
images of one size only); patchify and the token grid are `pixformer.layout`'s.

Position embeddings are functions of token coordinates (`position_embedding(grid, coords)`), so a
subset of tokens (MAE's visible ones, dropped tokens, a shard, packed images) gets the rows it
would have in the full grid. `Block` is the one Transformer block of the package: pre-norm, or
modulated from a conditioning vector (DiT's adaLN-Zero) when built with `cond_dim`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import PixformerError
from ..layout import Packed, check_grid, check_images, grid_coords, patchify, unpatchify
from ..settings import check_fields, require, square
from .attention import AttnSpec, attention
from .packed import segment_first, segment_mean
from .pos_embed import rescale_coords, sample_table, sincos_2d


@dataclass
class ViTConfig:
    img_size: tuple[int, int] = (32, 32)  # size trained at; sets the learned position table's grid
    patch_size: int = 16                  # patch side in pixels; 1 = one token per pixel (PiT)
    in_chans: int = 3                     # image channels (set by the data)
    num_classes: int = 10                 # 0 = no head (an encoder for other tasks)
    depth: int = 12                       # Transformer blocks
    dim: int = 192                        # width: features per token
    heads: int = 3                        # attention heads (dividing the width)
    mlp_ratio: float = 4.0                # MLP hidden width / width
    qkv_bias: bool = True                 # biases in the query / key / value projection
    pool: str = "cls"                     # "cls" token or "mean" (global average pooling)
    pos_embed: str = "learned"            # "learned" (a 2-D table), "factorized" (NaViT's rows + columns),
                                          # "sincos2d" or "none"
    drop_path: float = 0.0                # stochastic depth rate of the last block (linear in depth)
    fc_norm: bool = False                 # pool="mean" only: a norm of the pooled mean instead of one per
                                          # token (MAE's fine-tuning head)
    pos_coords: str = "fractional"        # learned tables ("learned", "factorized"): "fractional" (a token's
                                          # place relative to its image's side; any grid) or "absolute" (its
                                          # own row and column; grids beyond the table cannot be embedded).
                                          # sincos2d always takes the coordinates as they are.
    stem: str = "linear"                  # "linear" (each patch a linear map: ViT, PiT) or "conv" (3x3
                                          # convolutions, stride 2 each, BatchNorm and GELU, then a 1x1 map
                                          # to the width: Xiao et al. 2021; whole square-batch images only)

    def __post_init__(self):
        self.img_size = square(self.img_size)
        check_fields(self)                                          # every field its type, in one line if not
        for name in ("patch_size", "dim", "heads"):
            require(name, getattr(self, name), getattr(self, name) >= 1, "at least 1")
        require("depth", self.depth, self.depth >= 0, "at least 0")
        require("in_chans", self.in_chans, self.in_chans >= 1, "at least 1")
        require("num_classes", self.num_classes, self.num_classes >= 0, "at least 0 (0: no head)")
        require("mlp_ratio", self.mlp_ratio, self.mlp_ratio > 0, "> 0")
        require("drop_path", self.drop_path, 0 <= self.drop_path < 1, "in [0, 1)")
        if self.pool not in ("cls", "mean"):
            raise PixformerError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.fc_norm and self.pool != "mean":
            raise PixformerError("fc_norm normalises the mean of the tokens: it needs pool='mean'")
        if self.pos_embed not in ("learned", "factorized", "sincos2d", "none"):
            raise PixformerError(f"pos_embed must be 'learned', 'factorized', 'sincos2d' or 'none', got {self.pos_embed!r}")
        if self.stem not in ("linear", "conv"):
            raise PixformerError(f"stem must be 'linear' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise PixformerError(f"a convolutional stem halves the image per convolution: patch size must be a power "
                                 f"of 2, got {self.patch_size}")
        if self.pos_coords not in ("fractional", "absolute"):
            raise PixformerError(f"pos_coords must be 'fractional' or 'absolute', got {self.pos_coords!r}")
        if self.dim % self.heads:
            raise PixformerError(f"width {self.dim} is not divisible by {self.heads} heads")
        if self.pos_embed == "sincos2d" and self.dim % 4:
            raise PixformerError(f"sincos2d position embedding needs a width divisible by 4, got {self.dim}")
        check_grid(self.img_size, self.patch_size)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a sample's residual branch with probability `rate`. A sample is a row of the
    batch: in a packed batch a pack, so the images packed together are dropped together (each image's
    rate is still `rate`)."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_backend = "auto"   # set from outside: attention.set_attention_backend
        self.record_to = None        # a list while attention.record_attention is active

    def forward(self, x: Tensor, spec: AttnSpec | None = None) -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))                  # (B, N, 3, H, Dh)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))                 # (B, H, N, Dh) views; the
        # backward stacks their gradients straight into qkv's layout (one copy, not two)
        out, probs = attention(q, k, v, spec, backend=self.attn_backend,
                               need_weights=self.record_to is not None)  # (B, H, N, Dh)
        if probs is not None:
            self.record_to.append(probs.detach())
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    With `cond_dim` > 0 it is DiT's adaLN-Zero block: a linear map of the conditioning vector gives
    shift, scale and gate for each branch, x + gate * Attn(LN(x) * (1 + scale) + shift), the norms have
    no affine parameters of their own, and the map starts at zero so the block starts as the identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, cond_dim: int = 0):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(1e-6) if cond_dim else nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = ModulatedLayerNorm(1e-6) if cond_dim else nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(cond_dim, 6 * dim) if cond_dim else None
        self.drop_path = drop_path

    def forward(self, x: Tensor, spec: AttnSpec | None = None, cond: Tensor | None = None) -> Tensor:
        if self.modulation is None:
            x = x + drop_path(self.attn(self.norm1(x), spec), self.drop_path, self.training)    # (B, N, D)
            return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)        # (B, N, D)
        if cond is None:
            raise PixformerError("this block is conditioned (adaLN-Zero): pass cond, a (B, cond_dim) tensor")
        mod = conditioning_map(self.modulation, cond, x.dtype)[:, None]       # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)    # (B, 1, D) each
        h = self.attn(self.norm1(x, shift1, scale1), spec)                     # (B, N, D)
        x = gated_residual(x, gate1, h, self.drop_path, self.training)         # (B, N, D)
        h = self.mlp(self.norm2(x, shift2, scale2))                            # (B, N, D)
        return gated_residual(x, gate2, h, self.drop_path, self.training)      # (B, N, D)


def conditioning_map(layer: nn.Linear, cond: Tensor, dtype: torch.dtype) -> Tensor:
    """adaLN's layer(SiLU(cond)) in the layer's own precision even under autocast, then cast to `dtype`:
    a few rows (one per image), so no half-precision copy of its (k D, D) weight is made and kept for
    the backward (DiT-S: 20 MiB over its blocks)."""
    with torch.autocast(cond.device.type, enabled=False):
        return layer(F.silu(cond.to(layer.weight.dtype))).to(dtype)            # (B, k D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN's x * (1 + scale) + shift as one addcmul (not a product and then a sum over the tokens)."""
    return torch.addcmul(shift, x, 1 + scale)


class _ModulatedNorm(torch.autograd.Function):
    """LayerNorm without affine parameters, then adaLN's modulation; keeps x (which its LayerNorm kept
    anyway), not the normalised x: the backward recomputes that in one pass, under the autocast state of
    the forward (CUDA's autocast runs LayerNorm in fp32, CPU's in the input's dtype)."""

    @staticmethod
    def forward(ctx, x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, scale)
        ctx.eps, ctx.shift_shape, ctx.shift_dtype, kind = eps, shift.shape, shift.dtype, x.device.type
        ctx.autocast = dict(device_type=kind, dtype=torch.get_autocast_dtype(kind),
                            enabled=torch.is_autocast_enabled(kind))
        return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, scale = ctx.saved_tensors
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            xr = x.detach().requires_grad_()
            n = F.layer_norm(xr, xr.shape[-1:], eps=ctx.eps)                    # recomputed as in the forward
        dx, = torch.autograd.grad(n, xr, g * (1 + scale))
        dshift = g.sum_to_size(ctx.shift_shape).to(ctx.shift_dtype)
        return dx, dshift, (g * n.detach()).sum_to_size(scale.shape).to(scale.dtype), None


def modulated_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """modulate(LayerNorm(x), shift, scale) for a LayerNorm without affine parameters, keeping for the
    backward only what the LayerNorm keeps."""
    return _ModulatedNorm.apply(x, shift, scale, eps)


class ModulatedLayerNorm(nn.Module):
    """modulated_norm as a module (adaLN's norms have no parameters of their own): (B, N, D), with shift
    and scale (B, 1, D) -> (B, N, D)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return modulated_norm(x, shift, scale, self.eps)


def gated_residual(x: Tensor, gate: Tensor, h: Tensor, rate: float, training: bool) -> Tensor:
    """x + drop_path(gate * h): one addcmul where no path is dropped (no gate * h of its own)."""
    if rate == 0.0 or not training:
        return torch.addcmul(x, gate, h)
    return x + drop_path(gate * h, rate, training)


def conv_stem(in_chans: int, dim: int, patch: int) -> nn.Sequential:
    """A convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better") for
    patch size p = 2^k: k 3x3 convolutions of stride 2 (one of stride 1 for p = 1), each followed by
    BatchNorm and GELU, the i-th of n with dim / 2^(n - i) channels; (B, C, H, W) ->
    (B, c, H/p, W/p). The model's 1x1 `patch_embed` then maps c to the width."""
    k = patch.bit_length() - 1
    n = max(k, 1)
    widths = [max(dim >> (n - i), 8) for i in range(1, n + 1)]
    layers, c = [], in_chans
    for w in widths:
        layers.append(nn.Sequential(nn.Conv2d(c, w, 3, stride=2 if k else 1, padding=1, bias=False),
                                    nn.BatchNorm2d(w), nn.GELU()))
        c = w
    return nn.Sequential(*layers)


def init_transformer(model: nn.Module) -> None:
    """The weight initialisation of every Transformer built of `Block`s, in one place: truncated
    normal (std 0.02) for linear weights, zero biases, unit LayerNorm, and zero adaLN-Zero modulation
    (each conditioned block starts as the identity). Models add their own embeddings and heads."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias) if m.bias is not None else None
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, Block) and m.modulation is not None:
            nn.init.zeros_(m.modulation.weight)
            nn.init.zeros_(m.modulation.bias)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.dim
        self.pos_grid = check_grid(cfg.img_size, p)
        self.stem = conv_stem(cfg.in_chans, D, p) if cfg.stem == "conv" else None
        if self.stem is None:
            self.patch_embed = nn.Linear(cfg.in_chans * p * p, D)  # p = 1: a linear map of the pixel's channels
        else:                                                       # the stem's channels to the width
            self.patch_embed = nn.Conv2d(self.stem[-1][0].out_channels, D, 1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        self.pos_table = nn.Parameter(torch.zeros(*self.pos_grid, D)) if cfg.pos_embed == "learned" else None
        factorized = cfg.pos_embed == "factorized"                       # phi_row(r) + phi_col(c)
        self.pos_rows = nn.Parameter(torch.zeros(self.pos_grid[0], D)) if factorized else None
        self.pos_cols = nn.Parameter(torch.zeros(self.pos_grid[1], D)) if factorized else None
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, r) for r in rates)
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(D, eps=1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if cfg.fc_norm else nn.Identity()
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.init_weights()

    def init_weights(self):
        """All initialisation in one place: the Transformer's (init_transformer), truncated normal
        (std 0.02) class token and position tables, and a zero classifier (the ViT recipe); a
        convolutional stem as PyTorch initialises convolutions (Kaiming-uniform) and unit BatchNorm."""
        init_transformer(self)
        for m in (self.stem.modules() if self.stem is not None else ()):
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()
        if self.stem is not None:
            self.patch_embed.reset_parameters()
        for prm in (self.cls_token, self.pos_table, self.pos_rows, self.pos_cols):
            if prm is not None:
                nn.init.trunc_normal_(prm, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)

    # ---- the encoder interface -------------------------------------------------------------
    def patchify(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> (B, N, p*p*C) patch vectors in row-major grid order, and the grid."""
        return patchify(check_images(images, self.cfg.in_chans), self.cfg.patch_size)

    def unpatchify(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of `patchify`."""
        return unpatchify(patches, self.cfg.patch_size, grid)

    def position_embedding(self, grid: tuple[int, int] | Tensor, coords: Tensor | None = None) -> Tensor | None:
        """Embedding (..., D) of tokens at `coords` (..., 2) (row, col) on a `grid` (default: every grid
        cell, row-major: (N, D)), or None for pos_embed='none'. `grid` is one (rows, cols) or, for tokens
        of different images (packed), each token's own image grid (..., 2). Any subset, order or batch
        of coordinates gets the rows the full grid would give them. With fractional coordinates a
        learned table is resampled bilinearly when a grid differs from the one trained at (factorized
        tables linearly, each on its axis); absolute coordinates index the table as they are and
        refuse what lies beyond it; sincos is computed for the coordinates as they are."""
        if self.cfg.pos_embed == "none":
            return None
        if coords is None:
            if self.pos_table is not None and tuple(grid) == self.pos_grid:
                return self.pos_table.reshape(-1, self.cfg.dim)            # the table itself
            coords = grid_coords(*grid, device=self.patch_embed.weight.device)
        flat = coords.reshape(-1, 2).float()                               # (M, 2)
        if self.cfg.pos_embed == "sincos2d":
            pe = sincos_2d(flat, self.cfg.dim).to(self.patch_embed.weight.dtype)
        else:
            at = self._table_coords(flat, grid)                            # (M, 2) in table units
            if self.pos_table is not None:
                pe = sample_table(self.pos_table, at)
            else:                                                          # 1-D tables, sampled as (n, 1, D)
                zero = torch.zeros_like(at[:, :1])
                pe = (sample_table(self.pos_rows[:, None], torch.cat([at[:, :1], zero], 1))
                      + sample_table(self.pos_cols[:, None], torch.cat([at[:, 1:], zero], 1)))
        return pe.reshape(*coords.shape[:-1], self.cfg.dim)                # (..., D)

    def _table_coords(self, flat: Tensor, grid: tuple[int, int] | Tensor) -> Tensor:
        """Token coordinates (M, 2) on `grid` -> where a learned table is sampled (table units)."""
        if self.cfg.pos_coords == "absolute":
            beyond = flat.amax(0) > torch.tensor(self.pos_grid, device=flat.device) - 1 if len(flat) else None
            if beyond is not None and bool(beyond.any()):
                top = flat.amax(0).long().tolist()
                raise PixformerError(
                    f"pos_embed {self.cfg.pos_embed!r} with absolute coordinates cannot extrapolate: a token at row "
                    f"{top[0]}, column {top[1]} lies beyond the {self.pos_grid[0]}x{self.pos_grid[1]} table; use a "
                    "smaller image, pos_coords 'fractional' or sincos2d")
            return flat
        if not isinstance(grid, Tensor):
            return flat if tuple(grid) == self.pos_grid else rescale_coords(flat, grid, self.pos_grid)
        return rescale_coords(flat, grid.reshape(-1, 2), self.pos_grid)   # each token on its own image's grid

    def embed_tokens(self, patches: Tensor, grid: tuple[int, int] | Tensor, coords: Tensor | None = None) -> Tensor:
        """The one embedding step of whole images, packs and shards: patch vectors (B, N, p*p*C) -> tokens
        (B, N, D), each a linear map of its patch plus the position embedding of its coordinates `coords`
        ((N, 2) or (B, N, 2); default every cell of `grid`, row-major) on `grid` (one (rows, cols), or
        each token's own image grid (B, N, 2)): see `position_embedding`."""
        if self.stem is not None:
            raise PixformerError("a convolutional stem (stem='conv') embeds whole images of one size; packed images, "
                                 "MAE's visible patches and sequence shards need the linear stem")
        x = self.patch_embed(patches)                                     # (B, N, D)
        pos = self.position_embedding(grid, coords)                       # (N, D), (B, N, D) or None
        return self._stream(x, pos)                                       # (B, N, D)

    def _stream(self, x: Tensor, pos: Tensor | None) -> Tensor:
        """The residual stream: embedded tokens plus their position embedding, in the weights' dtype (fp32
        under autocast, where the embedding's output is bf16), with a position embedding or without."""
        return x.to(self.patch_embed.weight.dtype) if pos is None else x + pos

    def embed(self, images: Tensor, coords: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> (B, N, D) patch tokens with position embedding added, and the grid."""
        if self.stem is None:
            patches, grid = self.patchify(images)                         # (B, N, p*p*C)
            return self.embed_tokens(patches, grid, coords), grid         # (B, N, D)
        if images.ndim != 4 or images.shape[1] != self.cfg.in_chans or coords is not None:
            raise PixformerError(f"a convolutional stem embeds every token of whole images (B, {self.cfg.in_chans}, H, "
                                 f"W); got {tuple(images.shape)}{' and coords' if coords is not None else ''}")
        grid = check_grid(tuple(images.shape[-2:]), self.cfg.patch_size)
        x = self.patch_embed(self.stem(images)).flatten(2).transpose(1, 2)   # (B, N, D), row-major as patchify
        pos = self.position_embedding(grid)                               # (N, D) or None
        return self._stream(x, pos), grid                                 # (B, N, D)

    def prepend_cls(self, tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, 1+N, D) with the class token first; unchanged for a model without one."""
        if self.cls_token is None:
            return tokens
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def encode(self, x: Tensor, spec: AttnSpec | list[AttnSpec] | None = None) -> Tensor:
        """(B, T, D) tokens -> (B, T, D) features after the blocks and the final norm (none with fc_norm);
        `spec` one for every block, or a list of one per block."""
        specs = spec if isinstance(spec, list) else [spec] * len(self.blocks)
        for block, block_spec in zip(self.blocks, specs, strict=True):
            x = block(x, block_spec)                                      # (B, T, D)
        return self.norm(x)                                               # (B, T, D)

    def pool(self, feats: Tensor, how: str | None = None) -> Tensor:
        """(B, T, D) -> (B, D): the class token ("cls"), or the mean of the patch tokens ("mean", then
        fc_norm, if any); by default the model's own pooling (a probe may ask for the other)."""
        how = how or ("cls" if self.cls_token is not None else "mean")
        if how == "cls":
            return feats[:, 0]
        pooled = feats[:, int(self.cls_token is not None):].mean(dim=1)   # (B, D), patch tokens only
        return self.fc_norm(pooled)

    def embed_packed(self, packed: Packed) -> Tensor:
        """Packed images -> (P, L, D) tokens: each patch embedded at its coordinates on its own image's
        grid, each image's class-token slot (if the model has a class token) holding the class token."""
        x = self.embed_tokens(packed.patches, packed.grids, packed.coords)   # (P, L, D)
        if self.cls_token is None:
            return x
        if packed.cls_slots is None:
            raise PixformerError("this model pools a class token: pack its images with a class-token slot each")
        return torch.where(packed.cls_slots[..., None], self.cls_token.to(x.dtype), x)   # (P, L, D)

    def pool_packed(self, feats: Tensor, packed: Packed) -> Tensor:
        """(P, L, D) -> (M, D), one row per image: its class token, or the mean of its own patch tokens."""
        if self.cls_token is not None:
            return segment_first(feats, packed.segments, packed.cls_slots, packed.n_images)
        pooled = segment_mean(feats, packed.segments, packed.image_tokens(), packed.n_images)   # (M, D)
        return self.fc_norm(pooled)

    def forward(self, images: Tensor | Packed) -> Tensor:
        if isinstance(images, Packed):                                    # images of any sizes, packed
            x = self.embed_packed(images)                                 # (P, L, D)
            feats = self.encode(x, AttnSpec(segment_ids=images.segments))  # (P, L, D), within each image
            return self.head(self.pool_packed(feats, images))             # (M, classes)
        tokens, _ = self.embed(images)                                    # (B, N, D)
        x = self.prepend_cls(tokens)                                      # (B, T, D), T = N (+1 class token)
        feats = self.encode(x)                                            # (B, T, D)
        return self.head(self.pool(feats))                                # (B, classes)

    # ---- cost ------------------------------------------------------------------------------
    def flops(self, img_size: tuple[int, int] | None = None) -> int:
        """Forward FLOPs for one image (a multiply-add counts as 2), matmuls only."""
        c = self.cfg
        gh, gw = check_grid(img_size or c.img_size, c.patch_size)
        n = gh * gw
        t = n + (c.pool == "cls")
        per_block = block_flops(t, c.dim, int(c.dim * c.mlp_ratio))
        if self.stem is None:
            embed = 2 * n * c.in_chans * c.patch_size ** 2 * c.dim
        else:                             # each 3x3 conv at its output resolution, then the 1x1 map
            convs = [m for m in self.stem.modules() if isinstance(m, nn.Conv2d)]
            side = [(gh * c.patch_size // m.stride[0] ** (i + 1)) * (gw * c.patch_size // m.stride[0] ** (i + 1))
                    for i, m in enumerate(convs)]
            embed = sum(2 * s * 9 * m.in_channels * m.out_channels for s, m in zip(side, convs))
            embed += 2 * n * convs[-1].out_channels * c.dim
        return embed + c.depth * per_block + 2 * c.dim * c.num_classes


def block_flops(tokens: int, dim: int, hidden: int) -> int:
    """Forward FLOPs of one Transformer block over `tokens` tokens (a multiply-add counts as 2), matmuls
    only: the qkv and output projections, the MLP (`hidden` wide) and attention's QK^T and PV."""
    return 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 2 * 2 * tokens * tokens * dim
