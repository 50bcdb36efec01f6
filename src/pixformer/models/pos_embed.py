"""Position encodings as pure functions of token coordinates.

A token's coordinate is its (row, col) on the token grid, as floats (`pixformer.layout.grid_coords`
gives a whole grid's). Nothing here assumes a square grid or a particular sequence length, so any
patch size, resolution, aspect ratio or packing works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import grid_coords


def sincos_1d(pos: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """(N,) positions -> (N, dim) features: [sin(pos * w_k), cos(pos * w_k)], w_k = T^(-k / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sincos embedding needs an even dimension, got {dim}")
    omega = temperature ** (-torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim // 2))
    angles = pos.double()[:, None] * omega[None, :]                     # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()      # (N, dim)


def sincos_2d(coords: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """(N, 2) coordinates -> (N, dim): half the channels encode the row, half the column (as in MAE)."""
    if dim % 4:
        raise ValueError(f"2-D sincos embedding needs a dimension divisible by 4, got {dim}")
    return torch.cat([sincos_1d(coords[:, 0], dim // 2, temperature),
                      sincos_1d(coords[:, 1], dim // 2, temperature)], dim=1)


def rescale_coords(coords: Tensor, grid: tuple[int, int] | Tensor, ref_grid: tuple[int, int]) -> Tensor:
    """Map coordinates on `grid` (one (rows, cols), or each coordinate's own grid, a tensor shaped like
    `coords`) to the same relative image location on `ref_grid` (pixel-centre alignment, the
    convention of bilinear resizing with align_corners=False)."""
    ref = torch.tensor(ref_grid, dtype=torch.float32, device=coords.device)
    grid = torch.as_tensor(grid, dtype=torch.float32, device=coords.device)
    return (coords + 0.5) * (ref / grid) - 0.5


def resample_table(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """A learned (R, C, D) table resampled to a (rows, cols) grid, as the model samples it for an
    image of that grid (pixel-centre alignment, bilinear): (rows, cols, D)."""
    ref = tuple(table.shape[:2])
    coords = rescale_coords(grid_coords(*grid, device=table.device), tuple(grid), ref)
    return sample_table(table, coords).reshape(*grid, table.shape[-1])


def resample_positions(value: Tensor, size: tuple[int, ...]) -> Tensor:
    """A learned position table moved to another grid as resample_table moves it: a 2-D table (R, C, D)
    to `size` = (rows, cols), or one axis of a factorized one (n, D) to `size` = (m,). In value's dtype."""
    if value.ndim == 3:
        return resample_table(value.float(), tuple(size)).to(value.dtype)
    return resample_table(value.float()[:, None], (size[0], 1))[:, 0].to(value.dtype)


def sample_table(table: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample a learned (R, C, D) embedding table at (N, 2) fractional coordinates given in
    table units; coordinates beyond the edge take the border value. Exact at integer coordinates."""
    R, C, D = table.shape
    # grid_sample wants (x, y) in [-1, 1] with align_corners=True meaning -1 / +1 are the edge centres
    x = coords[:, 1] * (2.0 / max(C - 1, 1)) - 1.0 if C > 1 else torch.zeros_like(coords[:, 1])
    y = coords[:, 0] * (2.0 / max(R - 1, 1)) - 1.0 if R > 1 else torch.zeros_like(coords[:, 0])
    grid = torch.stack([x, y], dim=-1).to(table.dtype)[None, None]     # (1, 1, N, 2)
    img = table.permute(2, 0, 1)[None]                                 # (1, D, R, C)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, 0].t()                                            # (N, D)
