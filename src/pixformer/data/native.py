"""Images at their native resolution and aspect ratio, as NaViT trains on them ("Patch n' Pack").

    --max-side S / --max-tokens N    each image scaled down (aspect kept) until its longer side is at
                                     most S pixels / its patch grid at most N tokens; never up
    --resolution-range LO HI         training only: each image's longer side drawn uniformly from
                                     [LO, HI] per step (NaViT's resolution sampling), then the budgets
    --token-drop R / --token-drop-beta A B
                                     training only: a per-image rate of tokens dropped at random before
                                     packing (constant, or drawn from Beta(A, B)); ceil(N (1 - r)) kept
    --pack-length L, --max-per-pack K
                                     images' token sequences packed greedily (first fit, longest first)
                                     into sequences of at most L tokens, at most K images each; without a
                                     pack length every image has a row of its own, padded to the batch's
                                     largest

A batch becomes one `Packed` (pixformer.layout): the model attends within each image by segment ids
and pools per image. Sides are rounded to whole patches.

Bounded shapes (`bucket`; `batcher_for` turns it on where attention is compiled per shape: on GPUs,
or with --compile; on CPU the varlen backend attends to each image as it is and padding would only
cost): the number of packs P and their length L are rounded up the ladder 1, 2, 3, 4, 6, 8, 12, 16,
24, 32, 48, ... (`bucket_size`: under a third of a padded size is padding), L at most the pack length
or, without one, the longest sequence the budgets allow. A run then sees a few distinct (P, L)
shapes, so what is compiled per shape (compiled blocks, FlexAttention's block masks) is not rebuilt
every batch. Added rows are all padding (segment -1); padding never changes an image's result.
Unbounded (`pack_tight`), packs are as short as they can be: as many as first fit needs at L tokens,
at the shortest length that still fits them into that many, so the padding left is what the images'
lengths leave, not what L does (32 images of 576 tokens at L = 1024: 32 packs of 576, no padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import PixformerError
from ..layout import Packed, grid_coords, patchify
from .augment import resize


def fit_grid(h: int, w: int, patch: int, max_side: int | None = None, max_tokens: int | None = None,
             side: int | None = None) -> tuple[int, int]:
    """The token grid (rows, cols) an h x w image is given: its longer side set to `side` (if given) or
    kept, then scaled down to at most `max_side` pixels and `max_tokens` tokens; aspect ratio kept,
    each side a whole number of patches (at least one)."""
    scale = (side / max(h, w)) if side else 1.0
    if max_side:
        scale = min(scale, max_side / max(h, w))
    gh, gw = max(1, round(h * scale / patch)), max(1, round(w * scale / patch))
    if max_side:                                  # rounding may not cross the cap
        gh, gw = min(gh, max(max_side // patch, 1)), min(gw, max(max_side // patch, 1))
    if max_tokens and gh * gw > max_tokens:
        f = math.sqrt(max_tokens / (gh * gw))
        gh, gw = max(1, math.floor(gh * f)), max(1, math.floor(gw * f))
        while gh * gw > max_tokens:               # floors keep the aspect; trim the longer side if need be
            gh, gw = (gh - 1, gw) if gh >= gw else (gh, gw - 1)
    return gh, gw


def kept_tokens(n: int, rate: float, g: torch.Generator | None) -> Tensor:
    """Indices (sorted) of the ceil(n (1 - rate)) tokens of n kept when dropping at `rate`, drawn by `g`."""
    keep = max(1, math.ceil(n * (1.0 - rate) - 1e-9))
    if keep >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=g)[:keep].sort().values


def bucket_size(n: int, cap: int | None = None) -> int:
    """The smallest size >= n on the ladder 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ... (powers of two and
    1.5 times them: two sizes an octave, under a third of the size padding), at most `cap` (if n is)."""
    k = (max(n, 1) - 1).bit_length()                                   # 2^(k-1) < n <= 2^k
    size = 3 << (k - 2) if k >= 2 and 3 << (k - 2) >= n else 1 << k
    return min(size, cap) if cap is not None and n <= cap else size


def pack_sequences(lengths: list[int], pack_length: int, max_per_pack: int) -> list[list[int]]:
    """Greedy first-fit packing, longest first: lists of sequence indices whose lengths sum to at most
    `pack_length`, at most `max_per_pack` each; every sequence in exactly one pack."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > pack_length]
    if too_long:
        i, n = too_long[0]
        raise PixformerError(f"an image of {n} tokens does not fit --pack-length {pack_length}: set --max-tokens "
                             f"(at most {pack_length}) or a smaller --max-side, or a longer --pack-length")
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = next((j for j in range(len(packs)) if room[j] >= lengths[i] and len(packs[j]) < max_per_pack), None)
        if j is None:
            packs.append([])
            room.append(pack_length)
            j = len(packs) - 1
        packs[j].append(i)
        room[j] -= lengths[i]
    return packs


def pack_tight(lengths: list[int], pack_length: int, max_per_pack: int) -> tuple[list[list[int]], int]:
    """`pack_sequences` at the shortest pack length that needs no more packs than `pack_length` does
    (a binary search over lengths from the batch's share per pack up), and that length: the packs hold
    what they would and the padding left is what the images' lengths leave, not `pack_length`."""
    packs = pack_sequences(lengths, pack_length, max_per_pack)
    lo, hi = max(max(lengths), -(-sum(lengths) // len(packs))), pack_length
    while lo < hi:                                                         # first fit at hi always fits
        mid = (lo + hi) // 2
        if len(pack_sequences(lengths, mid, max_per_pack)) <= len(packs):
            hi = mid
        else:
            lo = mid + 1
    packs = pack_sequences(lengths, hi, max_per_pack) if hi < pack_length else packs
    return packs, max(sum(lengths[i] for i in p) for p in packs)


@dataclass
class NativeBatcher:
    """Turns a list of uint8 images of any sizes into a `Packed` batch (see the module doc)."""
    patch: int                                  # pixels a token's side (the model's patch size)
    cls: bool                                   # a class-token slot per image
    max_side: int | None = None                 # images scaled down so their longer side is at most this
    max_tokens: int | None = None               # ... and their grid holds at most this many tokens
    pack_length: int | None = None              # most tokens in a pack (None: a row per image, padded)
    max_per_pack: int = 64                      # images a pack at most
    resolution_range: tuple[int, int] | None = None   # training: each image's longer side drawn from [lo, hi]
    token_drop: float = 0.0                     # training: the share of each image's tokens dropped
    token_drop_beta: tuple[float, float] | None = None  # training: the drop rate drawn per image from Beta(a, b)
    side: int | None = None                     # every image's longer side set to this (evaluation at a resolution)
    bucket: bool = True                         # pad P and L up to a few sizes (bounded shapes, see the module doc)

    def __post_init__(self):
        if not (self.max_side or self.max_tokens):
            raise PixformerError("native resolution needs a budget: --max-side S or --max-tokens N")
        if not 0 <= self.token_drop < 1:
            raise PixformerError(f"--token-drop is a rate in [0, 1), got {self.token_drop}")
        if self.resolution_range is not None:
            lo, hi = self.resolution_range
            if not 0 < lo <= hi:
                raise PixformerError(f"--resolution-range needs 0 < LO <= HI, got {lo} {hi}")
        if self.token_drop_beta is not None and min(self.token_drop_beta) <= 0:
            raise PixformerError(f"--token-drop-beta takes two Beta parameters > 0, got {self.token_drop_beta}")
        if self.pack_length is not None:
            if self.max_per_pack < 1:
                raise PixformerError(f"--max-per-pack must be at least 1, got {self.max_per_pack}")
            if self.longest > self.pack_length:
                raise PixformerError(f"--pack-length {self.pack_length} is shorter than one image's tokens (up to "
                                     f"{self.longest} with these budgets); use a longer pack or a smaller --max-tokens")

    @property
    def longest(self) -> int:
        """The most tokens one image's sequence can have under the budgets (its class token included)."""
        side = max((self.max_side or 10 ** 9) // self.patch, 1)
        return min(self.max_tokens or side * side, side * side) + self.cls

    def grid(self, img: Tensor, side: int | None = None) -> tuple[int, int]:
        """The token grid `img` gets (at evaluation: side = self.side)."""
        return fit_grid(img.shape[-2], img.shape[-1], self.patch, self.max_side, self.max_tokens, side or self.side)

    def __call__(self, images: list[Tensor], normalize: Callable[[Tensor], Tensor],
                 g: torch.Generator | None = None, train: bool = False, part: slice | None = None) -> Packed:
        """Pack `images` (uint8 (C, H, W) each); `normalize` maps uint8 (1, C, H, W) to floats. With
        `train`, resolution sampling and token dropping draw from a generator per image, seeded from `g`
        for the whole list, so packing only the images in `part` (a rank's share) draws what packing
        them all would; otherwise neither is applied."""
        p = self.patch
        seeds = torch.randint(0, 2 ** 62, (len(images),), generator=g).tolist() if train else [0] * len(images)
        if part is not None:
            images, seeds = images[part], seeds[part]
        seqs = []                                                          # (patches, coords, grid) per image
        for img, seed in zip(images, seeds):
            gi = torch.Generator().manual_seed(seed) if train else None    # this image's draws
            side = self.side
            if train and self.resolution_range is not None:
                lo, hi = self.resolution_range
                side = int(torch.randint(lo, hi + 1, (1,), generator=gi))
            gh, gw = self.grid(img, side)
            x = normalize(resize(img[None], (gh * p, gw * p)))[0]           # (C, gh*p, gw*p) floats
            patches = patchify(x[None], p)[0][0]                           # (N, p*p*C), the model's layout
            coords = grid_coords(gh, gw)                                   # (N, 2)
            rate = self.drop_rate(gi) if train else 0.0
            if rate > 0:
                keep = kept_tokens(gh * gw, rate, gi)
                patches, coords = patches[keep], coords[keep]
            seqs.append((patches, coords, (gh, gw)))
        lengths = [len(s[0]) + self.cls for s in seqs]
        if self.pack_length is None:                                       # a row per image, padded
            packs, L, cap = [[i] for i in range(len(seqs))], max(lengths), self.longest
        elif self.bucket:
            packs = pack_sequences(lengths, self.pack_length, self.max_per_pack)
            L = cap = self.pack_length
        else:                                                              # shapes free: the shortest packs
            packs, L = pack_tight(lengths, self.pack_length, self.max_per_pack)
        P = len(packs)
        if self.bucket:                                                    # bounded shapes: up the ladder
            P, L = bucket_size(P), bucket_size(L, cap)
        dim = seqs[0][0].shape[1]
        patches = torch.zeros(P, L, dim, dtype=seqs[0][0].dtype)
        coords = torch.zeros(P, L, 2)
        grids = torch.ones(P, L, 2)
        segments = torch.full((P, L), -1, dtype=torch.long)
        cls_slots = torch.zeros(P, L, dtype=torch.bool) if self.cls else None
        for row, members in enumerate(packs):
            at = 0
            for i in members:
                x, c, grid = seqs[i]
                n = len(x) + self.cls
                segments[row, at: at + n] = i
                grids[row, at: at + n] = torch.tensor(grid, dtype=torch.float32)
                if self.cls:
                    cls_slots[row, at] = True
                patches[row, at + self.cls: at + n] = x
                coords[row, at + self.cls: at + n] = c
                at += n
        return Packed(patches, coords, grids, segments, len(images), cls_slots)

    def drop_rate(self, g: torch.Generator | None) -> float:
        """This image's drop rate: the constant, or a Beta(a, b) draw seeded from `g` (torch's Beta
        sampler takes no generator, so numpy's draws it)."""
        if self.token_drop_beta is None:
            return self.token_drop
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        return float(np.random.default_rng(seed).beta(*self.token_drop_beta))


def check_native_size(native: bool, img_size) -> None:
    """A clear error for a fixed image size asked together with native resolution."""
    if native and img_size:
        raise PixformerError("native resolution (--max-side / --max-tokens) keeps each image's size: drop --img-size")


def is_native(settings: dict) -> bool:
    """Whether a run's settings (a TrainConfig as a mapping) keep images at their own sizes: a budget is set."""
    return bool(settings.get("max_side") or settings.get("max_tokens"))


def table_side(max_side: int | None, max_tokens: int | None, patch: int) -> int:
    """The side (pixels, whole patches) of the square a learned position table is laid out for under
    these budgets: the --max-side, else the side of a square of --max-tokens tokens."""
    side = max_side or patch * math.ceil(math.sqrt(max_tokens))
    return patch * max(1, -(-side // patch))


def shrunk(h: int, w: int, max_side: int | None) -> tuple[int, int]:
    """(h, w) scaled down, aspect kept, so the longer side is at most `max_side` (unchanged if it is)."""
    if not max_side or max(h, w) <= max_side:
        return h, w
    f = max_side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def batcher_for(settings: dict, patch: int, cls_slot: bool, device="cpu",
                compiled: bool = False) -> NativeBatcher | None:
    """The batcher that packs a run's images into tokens of `patch` pixels a side (with a class-token slot
    leading each image if `cls_slot`; `pixformer.models.token_layout` gives both for a model), from the
    run's settings (a TrainConfig as a mapping); None for square images. Shapes are bounded (see the
    module doc) where attention is compiled per shape: on a GPU `device` (FlexAttention), or with
    `compiled` blocks (--compile)."""
    if not is_native(settings):
        return None
    rr, beta = settings.get("resolution_range"), settings.get("token_drop_beta")
    return NativeBatcher(patch, cls_slot, settings.get("max_side"), settings.get("max_tokens"),
                         settings.get("pack_length"), settings.get("max_per_pack", 64),
                         None if rr is None else tuple(rr), settings.get("token_drop", 0.0),
                         None if beta is None else tuple(beta), bucket=str(device).startswith("cuda") or compiled)
