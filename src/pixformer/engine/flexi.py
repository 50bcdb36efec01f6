"""Any granularity after training: a ViT's patch embedding resampled to another patch size by
FlexiViT's pseudo-inverse resize (Beyer et al., "FlexiViT: One Model for All Patch Sizes", 2023).

Resizing a p x p patch to q x q is a linear map B (q*q x p*p, per channel). The new embedding weights
w' solve <B x, w'> = <x, w> for every patch x, in the least-squares sense: w' = pinv(B^T) w. For
q >= p this is exact, so a model whose patch embedding was converted from p to q gives an image
resized by q/p the tokens the original gave the image (with `nearest` resizing, whole images resize
patch by patch, and the tokens match exactly); for q < p (down to pixels, q = 1) it is the best
least-squares fit. The position table is resampled to the new grid of the same image size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PixformerError

RESIZE_MODES = ("bilinear", "nearest")


def resize_matrix(p: int, q: int, mode: str = "bilinear") -> Tensor:
    """B (q*q, p*p): the linear map that resizes a flattened p x p patch to q x q (row-major)."""
    if mode not in RESIZE_MODES:
        raise PixformerError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    basis = torch.eye(p * p, dtype=torch.float64).reshape(p * p, 1, p, p)          # one image per input pixel
    kwargs = {"align_corners": False, "antialias": q < p} if mode == "bilinear" else {}
    out = F.interpolate(basis, size=(q, q), mode=mode, **kwargs)                      # (p*p, 1, q, q)
    return out.reshape(p * p, q * q).t()


def pi_resize(weight: Tensor, in_chans: int, p: int, q: int, mode: str = "bilinear") -> Tensor:
    """Patch-embedding weights (D, p*p*C) in pixformer's (p1 p2 c) input layout -> (D, q*q*C)."""
    D = weight.shape[0]
    if weight.shape[1] != p * p * in_chans:
        raise PixformerError(f"patch embedding of {weight.shape[1]} inputs is not {p}x{p}x{in_chans}")
    B = resize_matrix(p, q, mode)                                                   # (q*q, p*p)
    w = weight.double().reshape(D, p * p, in_chans)                                 # (D, p*p, C)
    new = torch.einsum("qp,dpc->dqc", torch.linalg.pinv(B.t()), w)                  # (D, q*q, C)
    return new.reshape(D, q * q * in_chans).to(weight.dtype)
