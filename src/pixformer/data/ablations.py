"""Locality ablations: fixed pixel permutations applied to every image, train and test alike.

Two corruptions, each a permutation `perm` of the H*W pixel positions, drawn once from a seed:
    out[..., i] = image[..., perm[i]]     (every channel moves together; the same for every image)

- `random_permutation`: all pixels shuffled. For a pixel Transformer (patch 1) this changes nothing
  that matters: without position embedding its output is exactly the same (attention is permutation-
  equivariant, pooling symmetric), and a learned table is learned for the permuted layout as well.
  Patches > 1 and convolutions lose their locality: neighbours in a patch are no longer neighbours.
- `swap_permutation`: the PiT paper's local corruption (arXiv 2406.09415, "locality designs in ViT"):
  T times, pick a pixel pair at most δ apart and swap the two. δ = None means anywhere in the image.
  Distance is Chebyshev (the partner lies in the (2δ+1) x (2δ+1) window around the first pixel).
  Swaps compose, so after many swaps a pixel can drift more than δ from where it began; each single
  swap stays within δ.

`permuted` applies a run's permutation to a split: training permutes its splits once, and `eval`
and `analyze` re-apply the permutation saved with the run through the same function. Batch
augmentation (random crop, flip, CutMix) then acts on the permuted images, so a crop is no longer a
shift of the picture: run locality ablations without spatial augmentation, as the documented ones (docs/results.md) do.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import PixformerError
from .store import ImageSet
from .store import as_tensor


def random_permutation(h: int, w: int, seed: int) -> Tensor:
    """A uniformly random permutation (H*W,) of the pixel positions."""
    return torch.from_numpy(np.random.default_rng(seed).permutation(h * w))


def sample_swaps(h: int, w: int, swaps: int, distance: int | None, seed: int) -> Tensor:
    """(T, 2) flat pixel indices (a, b), a != b, |row_a - row_b| <= δ and |col_a - col_b| <= δ:
    `a` uniform over the image, `b` uniform over the other pixels of a's window (clipped to the image)."""
    if h * w < 2:
        raise PixformerError(f"local swaps need at least 2 pixels, the image is {h}x{w}")
    d = max(h, w) if distance is None else distance
    rng = np.random.default_rng(seed)
    a = rng.integers(h * w, size=swaps)
    ra, ca = a // w, a % w
    r0, r1 = np.maximum(ra - d, 0), np.minimum(ra + d, h - 1)          # window rows r0..r1
    c0, c1 = np.maximum(ca - d, 0), np.minimum(ca + d, w - 1)          # window cols c0..c1
    nc = c1 - c0 + 1
    size = (r1 - r0 + 1) * nc                                          # window cells, a included
    k = rng.integers(size - 1)                                         # uniform in [0, size - 1)
    own = (ra - r0) * nc + (ca - c0)                                   # a's own cell in its window
    k = k + (k >= own)                                                 # skip it
    b = (r0 + k // nc) * w + (c0 + k % nc)
    return torch.from_numpy(np.stack([a, b], axis=1))


def swap_permutation(h: int, w: int, swaps: int, distance: int | None, seed: int) -> Tensor:
    """The permutation (H*W,) left by `swaps` sequential local swaps (`sample_swaps`) of the identity."""
    perm = np.arange(h * w)
    for a, b in sample_swaps(h, w, swaps, distance, seed).tolist():
        perm[a], perm[b] = perm[b], perm[a]
    return torch.from_numpy(perm)


def pixel_permutation(settings: Any, h: int, w: int) -> Tensor | None:
    """The permutation a run's settings ask for (TrainConfig or its saved dict: `permute_pixels`,
    `local_swaps`, `swap_distance`, `permute_seed`), or None when no ablation is on."""
    get = settings.get if isinstance(settings, dict) else lambda k, default: getattr(settings, k, default)
    permute, swaps = bool(get("permute_pixels", False)), int(get("local_swaps", 0) or 0)
    distance, seed = get("swap_distance", None), int(get("permute_seed", 0))
    if swaps < 0:
        raise PixformerError(f"local_swaps must be >= 0, got {swaps}")
    if distance is not None and distance < 1:
        raise PixformerError(f"swap_distance must be >= 1 (or unset for anywhere), got {distance}")
    if permute and swaps:
        raise PixformerError("choose one of permute_pixels and local_swaps (a full permutation already "
                             "destroys what local swaps would)")
    if permute:
        return random_permutation(h, w, seed)
    if swaps:
        return swap_permutation(h, w, swaps, distance, seed)
    return None


def apply_permutation(images: Tensor, perm: Tensor | None) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W) with out[..., i] = images[..., perm[i]] on flattened pixels."""
    if perm is None:
        return images
    N, C, H, W = images.shape
    if perm.numel() != H * W:
        raise PixformerError(f"a permutation of {perm.numel()} pixels does not fit {H}x{W} images")
    return images.reshape(N, C, H * W)[:, :, perm].reshape(N, C, H, W)


def permuted(data: ImageSet, settings: Any) -> ImageSet:
    """`data` with the pixel permutation that a run's settings ask for (see pixel_permutation) applied;
    unchanged when no ablation is on."""
    perm = pixel_permutation(settings, *data.images.shape[-2:])
    if perm is None:
        return data
    return ImageSet(apply_permutation(as_tensor(data.images), perm), data.labels, data.classes)
