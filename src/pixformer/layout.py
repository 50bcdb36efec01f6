"""Token layout, below both data/ and models/: how an image becomes a sequence of tokens and back, and
how images of different sizes share sequences. Pure bookkeeping of where each token sits; no weights.

    check_grid(size, p)              the token grid (rows, cols) of an image size, or a clear error
    patchify(images, p)              (B, C, H, W) -> (B, N, p*p*C) patch vectors, row-major, and the grid
    unpatchify(patches, p, grid)     its exact inverse
    grid_coords(rows, cols)          (N, 2) each token's (row, col) on a row-major grid
    Packed                           several images in one sequence (NaViT's "Patch n' Pack")

A `Packed` batch holds P packs of length L:

    packed.patches   (P, L, p*p*C)  patch vectors
    packed.coords    (P, L, 2)      each token's (row, col) on its image's token grid
    packed.grids     (P, L, 2)      that image's grid (rows, cols): fractional coordinates need it
    packed.segments  (P, L)         the image (0..M-1, its index in the batch) of each token; -1 = padding
    packed.cls_slots (P, L) bool    the slot of each image's class token (models with one), else None

`data/native.py` builds it (packing, token dropping, padding to bounded shapes); a ViT embeds each
token at its coordinates, attends within each image through the segment ids and pools per image. A
token dropped before packing is simply absent; its neighbours keep their coordinates. A row may be
all padding (the batcher pads P up to a bucket): it belongs to no image.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import Tensor

from .errors import PixformerError


def check_grid(img_size: tuple[int, int], patch: int) -> tuple[int, int]:
    """Token grid (rows, cols) of an image size, or a clear error if the patch does not tile it."""
    h, w = img_size
    if h < 1 or w < 1:
        raise PixformerError(f"image size {h}x{w}: both sides must be at least 1")
    if patch < 1 or h % patch or w % patch:
        raise PixformerError(f"image size {h}x{w} is not divisible by patch size {patch}")
    return h // patch, w // patch


def check_images(images: Tensor, chans: int) -> Tensor:
    """`images` if they are a batch (B, chans, H, W), else one line giving the shape expected and the one given."""
    if images.ndim != 4 or images.shape[1] != chans:
        raise PixformerError(f"expected images of shape (B, {chans}, H, W), got {tuple(images.shape)}")
    return images


def patchify(images: Tensor, p: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, H, W) -> (B, N, p*p*C) patch vectors in row-major grid order, and the grid (H/p, W/p)."""
    grid = check_grid(tuple(images.shape[-2:]), p)
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p), grid


def unpatchify(patches: Tensor, p: int, grid: tuple[int, int]) -> Tensor:
    """The exact inverse of `patchify`: (B, N, p*p*C) on a (rows, cols) grid -> (B, C, rows*p, cols*p)."""
    if patches.shape[1] != grid[0] * grid[1] or patches.shape[2] % (p * p):
        raise PixformerError(f"{patches.shape[1]} patches of {patches.shape[2]} values do not make a "
                             f"{grid[0]}x{grid[1]} grid of {p}x{p} patches")
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid[0], w=grid[1], p1=p, p2=p)


def grid_coords(rows: int, cols: int, device=None) -> Tensor:
    """(rows*cols, 2) float coordinates (row, col) of a row-major token grid."""
    r = torch.arange(rows, device=device, dtype=torch.float32)
    c = torch.arange(cols, device=device, dtype=torch.float32)
    return torch.cartesian_prod(r, c)


@dataclass
class Packed:
    """Images of different sizes packed into P sequences of L tokens (see the module doc)."""
    patches: Tensor
    coords: Tensor
    grids: Tensor
    segments: Tensor
    n_images: int
    cls_slots: Tensor | None = None

    def to(self, device) -> "Packed":
        return self._each(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Packed":
        """Every tensor in page-locked memory (a copy to a GPU then overlaps the step)."""
        return self._each(lambda t: t.pin_memory())

    def _each(self, f) -> "Packed":
        g = lambda t: None if t is None else f(t)  # noqa: E731
        return replace(self, patches=g(self.patches), coords=g(self.coords), grids=g(self.grids),
                       segments=g(self.segments), cls_slots=g(self.cls_slots))

    @property
    def useful(self) -> int:
        """Tokens that belong to an image (class tokens included), the rest of P * L being padding."""
        return int((self.segments >= 0).sum())

    def image_tokens(self) -> Tensor:
        """(P, L) bool: the patch tokens of images (no padding, no class tokens)."""
        keep = self.segments >= 0
        return keep if self.cls_slots is None else keep & ~self.cls_slots
