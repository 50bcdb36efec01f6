"""Several images in one sequence (NaViT's "Patch n' Pack"): what a ViT takes instead of an image batch
when the images differ in size. `data/native.py` builds it (greedy packing, token dropping); the model
embeds it, attends within each image through the attention spec's segment ids and pools per image.

    packed.patches   (P, L, p*p*C)  patch vectors of P packs of length L
    packed.coords    (P, L, 2)      each token's (row, col) on its image's token grid
    packed.grids     (P, L, 2)      that image's grid (rows, cols): fractional coordinates need it
    packed.segments  (P, L)         the image (0..M-1, its index in the batch) of each token; -1 = padding
    packed.cls_slots (P, L) bool    the slot of each image's class token (models with one), else None

A token dropped before packing is simply absent; its neighbours keep their coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class Packed:
    patches: Tensor
    coords: Tensor
    grids: Tensor
    segments: Tensor
    n_images: int
    cls_slots: Tensor | None = None

    def to(self, device) -> "Packed":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, patches=move(self.patches), coords=move(self.coords), grids=move(self.grids),
                       segments=move(self.segments), cls_slots=move(self.cls_slots))

    @property
    def useful(self) -> int:
        """Tokens that belong to an image (class tokens included), the rest of P * L being padding."""
        return int((self.segments >= 0).sum())

    def image_tokens(self) -> Tensor:
        """(P, L) bool: the patch tokens of images (no padding, no class tokens)."""
        keep = self.segments >= 0
        return keep if self.cls_slots is None else keep & ~self.cls_slots


def segment_mean(feats: Tensor, segments: Tensor, keep: Tensor, n: int) -> Tensor:
    """(P, L, D) features -> (n, D): the mean over the tokens of each segment where `keep` (P, L) is True;
    padding and other images never enter an image's mean."""
    seg, x = segments[keep], feats[keep]                                   # (K,), (K, D)
    sums = feats.new_zeros(n, feats.shape[-1], dtype=torch.float32).index_add_(0, seg, x.float())  # (n, D)
    counts = torch.bincount(seg, minlength=n).clamp_min(1)                 # (n,)
    return (sums / counts[:, None]).to(feats.dtype)


def segment_first(feats: Tensor, segments: Tensor, slots: Tensor, n: int) -> Tensor:
    """(P, L, D) -> (n, D): each segment's feature at its (single) slot marked in `slots` (P, L)."""
    out = feats.new_zeros(n, feats.shape[-1])
    return out.index_copy(0, segments[slots], feats[slots])
