"""Pooling over packed images (`pixformer.layout.Packed`, NaViT's "Patch n' Pack"): per-image
reductions of (P, L, D) features by segment id, where padding and other images never enter an
image's result. The packing itself is token layout and lives in `pixformer.layout`."""
from __future__ import annotations

import torch
from torch import Tensor



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
