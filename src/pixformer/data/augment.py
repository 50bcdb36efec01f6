"""Batches and augmentation as plain torch ops on whole batches.

The engine cuts a batch of uint8 images, crops and flips it (`random_crop`, `random_flip`), applies
RandAugment or TrivialAugmentWide (`rand_augment`, `trivial_augment`) and random erasing
(`random_erase`), then normalises it; `resize` scales uint8 images (a source to --img-size, a batch to
progressive resizing's side, an image to its packed grid); mixing (`mix`) acts on a task's targets and
belongs to the classification task. Repeated augmentation is in the batches' indices (`batch_indices`). Every random
draw comes from the step's generator.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def batch_indices(n: int, batch_size: int, epoch: int, seed: int, shuffle: bool = True,
                  repeats: int = 1) -> list[Tensor]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), the last partial batch dropped
    when shuffling (so every epoch has the same number of equal steps). With `repeats` K > 1 (repeated
    augmentation, DeiT's RASampler) each batch takes the next ceil(B / K) images of the permutation K
    times over, cut to B: the steps of an epoch are as many, and see about 1 / K of the images. The
    copies follow each other as whole runs (a b c a b c), so torchrun's ranks, each keeping a
    contiguous share of the batch, hold different copies, as in DeiT."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        bs = min(batch_size, n)
        m = -(-bs // repeats)                                            # distinct images a batch
        return [order[i * m:(i + 1) * m].repeat(repeats)[:bs] for i in range(n // bs)]
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


# ---- RandAugment, TrivialAugmentWide, random erasing ----------------------------------------------
# torchvision's ops (transforms/autoaugment.py), in its order, and their magnitudes in 31 bins.
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = torch.tensor([name in OPS[1:10] for name in OPS])     # those whose magnitude is negated at random
BINS = 31


def magnitudes(wide: bool, height: int, width: int) -> Tensor:
    """(len(OPS), BINS): each op's magnitude in each bin (0 for an op without one), as torchvision's
    RandAugment (wide False; an image's translation up to 150/331 of its side) and TrivialAugmentWide."""
    up = lambda top: torch.linspace(0.0, top, BINS)                                      # noqa: E731
    shear, rotate, enhance = (0.99, 135.0, 0.99) if wide else (0.3, 30.0, 0.9)
    tx, ty = (32.0, 32.0) if wide else (150.0 / 331.0 * width, 150.0 / 331.0 * height)
    posterize = 8 - (torch.arange(BINS) / ((BINS - 1) / (6 if wide else 4))).round()     # bits kept: 8 down to 4 (2)
    zero = torch.zeros(BINS)
    return torch.stack([zero, up(shear), up(shear), up(tx), up(ty), up(rotate), up(enhance), up(enhance),
                        up(enhance), up(enhance), posterize, torch.linspace(255.0, 0.0, BINS), zero, zero])


def rand_augment(x: Tensor, ops: int, magnitude: int, g: torch.Generator) -> Tensor:
    """RandAugment (Cubuk et al. 2020) as torchvision's: `ops` times, each image through an op of OPS
    drawn at random, at bin `magnitude` (of 0..30), signed magnitudes negated at random. uint8 in and
    out. (kornia's RandAugment draws from torch's global generator, which the loader threads share with
    dropout: here the policy is drawn from the step's generator and only kornia's operations are used.)"""
    table = magnitudes(False, *x.shape[-2:])
    for _ in range(ops):
        op = torch.randint(len(OPS), (len(x),), generator=g)
        x = apply_ops(x, op, _signed(table, op, torch.full_like(op, magnitude), g))
    return x


def trivial_augment(x: Tensor, g: torch.Generator) -> Tensor:
    """TrivialAugmentWide (Müller & Hutter 2021) as torchvision's: each image through one op of OPS at a
    magnitude bin drawn uniformly over the wide ranges. uint8 in and out; drawn from `g` (as rand_augment)."""
    op = torch.randint(len(OPS), (len(x),), generator=g)
    return apply_ops(x, op, _signed(magnitudes(True, *x.shape[-2:]), op, torch.randint(BINS, op.shape, generator=g), g))


def _signed(table: Tensor, op: Tensor, bins: Tensor, g: torch.Generator) -> Tensor:
    m = table[op, bins]
    flip = SIGNED[op] & (torch.randint(2, op.shape, generator=g) == 1)
    return torch.where(flip, -m, m)


def apply_ops(x: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
    """Each image of the uint8 batch `x` through OPS[op[i]] at magnitude[i], as torchvision applies it,
    on floats in [0, 1] rounded back to uint8 (torchvision truncates its uint8 results: a value may
    differ by one level); each op is called once, on the images that drew it."""
    from kornia import enhance                  # (imported here: only runs that augment pay its import)
    ops = {  # torchvision's brightness, color and contrast blend with black, the gray image, its mean gray
        "brightness": lambda y, m: enhance.adjust_brightness_accumulative(y, 1 + m),
        "color": lambda y, m: enhance.adjust_saturation_with_gray_subtraction(y, 1 + m),
        "contrast": lambda y, m: enhance.adjust_contrast_with_mean_subtraction(y, 1 + m),
        "sharpness": lambda y, m: enhance.sharpness(y, 1 + m) if min(y.shape[-2:]) > 2 else y,  # (torchvision: as is)
        "posterize": lambda y, m: enhance.posterize(y, m.int()),
        "solarize": lambda y, m: enhance.solarize(y, m / 255),
        "autocontrast": lambda y, m: autocontrast(y),
        "equalize": lambda y, m: enhance.equalize(y),
    }
    op, magnitude = op.to(x.device), magnitude.to(x.device)
    geometric = (op >= OPS.index("shear_x")) & (op <= OPS.index("rotate"))
    groups = [(geometric, lambda y, m: _warp(y, op[geometric], m))]
    groups += [(op == OPS.index(name), fn) for name, fn in ops.items()]
    out = x.clone()
    for chosen, fn in groups:
        if chosen.any():
            y = x[chosen].float().div_(255)
            out[chosen] = fn(y, magnitude[chosen]).mul_(255).round_().to(torch.uint8)
    return out


def _warp(y: Tensor, op: Tensor, m: Tensor) -> Tensor:
    """torchvision's geometric ops (nearest pixel, black outside) as one kornia warp_affine. In pixel
    coordinates (x right, y down), each image's map from input to output is the one of its op: ShearX
    x - m (y + 1/2) and ShearY y - m (x + 1/2) (about the image's top-left corner), a translation by
    int(m) pixels, a rotation by m degrees counter-clockwise about the centre."""
    from kornia.geometry.transform import warp_affine
    H, W = y.shape[-2:]
    m = m.double()
    is_ = lambda name: op == OPS.index(name)                                               # noqa: E731
    angle = torch.deg2rad(torch.where(is_("rotate"), m, 0))
    cos, sin = angle.cos(), angle.sin()
    shx, shy = torch.where(is_("shear_x"), m, 0), torch.where(is_("shear_y"), m, 0)
    tx, ty = torch.where(is_("translate_x"), m.trunc(), 0), torch.where(is_("translate_y"), m.trunc(), 0)
    cx, cy = (W - 1) / 2, (H - 1) / 2           # one op an image: the other ops' terms are 0 (cos 1, sin 0)
    M = torch.stack([torch.stack([cos, sin - shx, cx - cos * cx - sin * cy - shx / 2 + tx], -1),
                     torch.stack([-sin - shy, cos, cy + sin * cx - cos * cy - shy / 2 + ty], -1)], 1)
    return warp_affine(y, M.to(y), (H, W), mode="nearest", padding_mode="zeros", align_corners=True)


def autocontrast(y: Tensor) -> Tensor:
    """torchvision's autocontrast: each channel stretched to [0, 1], a constant one left as it is (written
    here: kornia's normalize_min_max sends a constant channel to 0)."""
    lo, hi = y.amin((-2, -1), keepdim=True), y.amax((-2, -1), keepdim=True)
    flat = hi == lo
    return ((y - torch.where(flat, 0, lo)) / torch.where(flat, 1, hi - lo)).clamp(0, 1)


def random_erase(x: Tensor, p: float, g: torch.Generator, area: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> Tensor:
    """Random erasing (Zhong et al. 2020) as DeiT runs it (timm's, "pixel" mode): each image, with
    probability `p`, gets one rectangle of `area` (fraction of the image) and aspect ratio log-uniform in
    `ratio`, the first of `attempts` draws that fits (none: the image is kept), filled with noise per
    pixel. DeiT erases normalised images with Gaussian noise; before normalisation, on uint8, the
    equivalent is uniform noise over 0..255. (Written here: kornia's RandomErasing draws from torch's
    global generator and fills with one value.)"""
    if p <= 0:
        return x
    B, C, H, W = x.shape
    hit = torch.rand(B, generator=g) < p
    target = torch.empty(B, attempts).uniform_(*area, generator=g) * (H * W)
    aspect = torch.empty(B, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    h, w = (target * aspect).sqrt().round().long(), (target / aspect).sqrt().round().long()
    fits = (h < H) & (w < W)
    first = fits.long().argmax(1, keepdim=True)                          # the first draw that fits
    hit &= fits.any(1)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = (torch.rand(B, generator=g) * (H - h + 1)).long()
    left = (torch.rand(B, generator=g) * (W - w + 1)).long()
    rows, cols = torch.arange(H), torch.arange(W)
    inside = (((rows >= top[:, None]) & (rows < (top + h)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + w)[:, None]))[:, None, :])     # (B, H, W)
    mask = (inside & hit[:, None, None])[:, None].to(x.device)
    noise = torch.randint(0, 256, x.shape, generator=g, dtype=torch.uint8).to(x.device)
    return torch.where(mask, noise, x)


def resize(images, size: tuple[int, int], chunk_values: int = 1 << 24) -> Tensor:
    """uint8 (N, C, H, W) (a tensor or a store) -> uint8 (N, C, *size) in memory, antialiased bilinear,
    in chunks of about `chunk_values` pixel values; the same object at the same size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    step = max(1, chunk_values // max(1, math.prod(images.shape[1:])))
    out = [F.interpolate(images[i: i + step].float(), size=tuple(size), mode="bilinear", antialias=True,
                         align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
           for i in range(0, len(images), step)]
    if len(out) == 1:                                  # a training batch (progressive resizing): no copy
        return out[0]
    return torch.cat(out) if out else torch.empty(0, images.shape[1], *size, dtype=torch.uint8)
