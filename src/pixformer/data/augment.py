"""Batches and augmentation as plain torch ops on whole batches (on the training device).

The engine cuts a batch of uint8 images, crops and flips it (`random_crop`, `random_flip`),
then normalises it; mixing (`mix`) acts on a task's targets and belongs to the classification task.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def batch_indices(n: int, batch_size: int, epoch: int, seed: int, shuffle: bool = True) -> list[Tensor]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), the last partial batch dropped
    when shuffling (so every epoch has the same number of equal steps)."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        bs = min(batch_size, n)
        return list(order[: n - n % bs].split(bs))
    return list(torch.arange(n).split(batch_size))


def normalize(images: Tensor, mean, std) -> Tensor:
    """uint8 (B, C, H, W) -> float, standardised per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def random_crop(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    """Pad each image by `pad` zeros and crop back at a random offset per image. The engine crops the
    uint8 images before normalising them, so the padding is black, as in the usual recipes."""
    if pad <= 0:
        return x
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=g).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=g).to(x.device)
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]     # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, None, :]     # (B, 1, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return xp[b, c, rows, cols]


def random_flip(x: Tensor, g: torch.Generator) -> Tensor:
    flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def mix(x: Tensor, y: Tensor, mixup: float, cutmix: float, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Mixup (alpha `mixup`) or CutMix (alpha `cutmix`), one chosen at random per batch when both are on.
    `y` is a soft target (B, K); returns mixed images and targets."""
    modes = [m for m, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]
    if not modes:
        return x, y
    mode = modes[rng.integers(len(modes))]
    lam = float(rng.beta(mixup, mixup) if mode == "mixup" else rng.beta(cutmix, cutmix))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    if mode == "mixup":
        x = lam * x + (1 - lam) * x[perm]
    else:
        H, W = x.shape[-2:]
        ch, cw = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    return x, lam * y + (1 - lam) * y[perm]
