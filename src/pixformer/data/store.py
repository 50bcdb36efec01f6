"""Image sets whose pixels stay where they are: in a memory-mapped decode cache, or in a tensor.

A split of a large folder source must not be read into memory, and a subset of it (a hold-out, a
--train-subset, a rank's rows) must not be a copy of it. So a split's images are a *store*: the pixels
(`base`, a tensor over a mapped file or in memory) and, for a subset, the rows it takes (`index`):

    ImageStore     images of one size (N, C, H, W): len(), .shape, store[i] -> (C, H, W) (a view),
                   store[idx] for an index tensor, list, bool mask or slice -> an in-memory (B, C, H, W)
                   tensor of just those rows, store.subset(idx) -> a store of those rows (no pixels
                   copied), store.materialize() -> the whole (N, C, H, W) as a tensor
    NativeStore    images of different sizes in one flat uint8 buffer, each at an offset with its own
                   (C, H_i, W_i): len(), store[i] -> a (C, H_i, W_i) view, iteration, subset(idx)

ImageSet and NativeSet hold the images (a store, or a tensor / list of tensors for the small in-memory
named sources: both work wherever images are used), labels and class names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _rows(key, n: int) -> Tensor:
    """An index key (int64 tensor, list, numpy array or bool mask over n rows) as an int64 tensor."""
    key = torch.as_tensor(key)
    if key.dtype == torch.bool:
        if len(key) != n:
            raise IndexError(f"a mask of {len(key)} values does not fit {n} images")
        return key.nonzero().flatten()
    return key.long().flatten()


class ImageStore:
    """Images of one size (N, C, H, W) uint8: the rows `index` of `base` (all of them when None).
    Indexing copies only the rows asked for; `subset` composes indices and copies no pixels."""

    def __init__(self, base: Tensor, index: Tensor | None = None):
        if base.dim() != 4:
            raise ValueError(f"an ImageStore holds (N, C, H, W) images, got shape {tuple(base.shape)}")
        self.base = base
        self.index = None if index is None else index.long()

    def __len__(self) -> int:
        return len(self.base) if self.index is None else len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.base.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        """The bytes of the pixels this store addresses (not memory it owns: see `owned_bytes`)."""
        return len(self) * math.prod(self.base.shape[1:]) * self.base.element_size()

    @property
    def owned_bytes(self) -> int:
        """Memory this store itself holds beyond its base: the index of a subset."""
        return 0 if self.index is None else self.index.numel() * self.index.element_size()

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, tuple):                                # rows first, then within them
            rows = self[key[0]]
            return rows[key[1:]] if rows.dim() == 3 else rows[(slice(None), *key[1:])]
        if isinstance(key, Tensor) and key.dim() == 0:
            key = int(key)
        if isinstance(key, (int, np.integer)):                    # one image: a view, (C, H, W)
            return self.base[int(key) if self.index is None else int(self.index[key])]
        if isinstance(key, slice):
            if self.index is None:
                return self.base[key].clone()
            return self.base.index_select(0, self.index[key])
        rows = _rows(key, len(self))
        return self.base.index_select(0, rows if self.index is None else self.index[rows])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def subset(self, idx) -> "ImageStore":
        rows = _rows(idx, len(self))
        return ImageStore(self.base, rows if self.index is None else self.index[rows])

    def materialize(self) -> Tensor:
        """All of these images as one (N, C, H, W) tensor: the base itself when this store is all of it
        (a tensor over the mapped file, no copy), else the rows copied. For callers that need the
        whole array at once (FID statistics, a pixel permutation); training indexes batches instead."""
        return self.base if self.index is None else self.base.index_select(0, self.index)

    def numpy(self) -> np.ndarray:
        return self.materialize().numpy()

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"ImageStore(shape={tuple(self.shape)}, {'all rows' if self.index is None else 'a subset'})"


class NativeStore:
    """Images of different sizes: one flat uint8 buffer `flat`, image j at `offsets[j]` with shape
    `shapes[j]` = (C, H, W); the images `index` of those (all when None). store[i] is a view."""

    def __init__(self, flat: Tensor, offsets: np.ndarray, shapes: np.ndarray, index: np.ndarray | None = None):
        self.flat, self.offsets, self.shapes = flat, offsets, shapes
        self.index = index

    def __len__(self) -> int:
        return len(self.offsets) if self.index is None else len(self.index)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(len(self))[key]]
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"image {key} of {len(self)}")
        j = i if self.index is None else int(self.index[i])
        c, h, w = (int(v) for v in self.shapes[j])
        start = int(self.offsets[j])
        return self.flat[start: start + c * h * w].view(c, h, w)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def subset(self, idx) -> "NativeStore":
        rows = _rows(idx, len(self)).numpy()
        return NativeStore(self.flat, self.offsets, self.shapes, rows if self.index is None else self.index[rows])

    @property
    def owned_bytes(self) -> int:
        return 0 if self.index is None else self.index.nbytes

    @classmethod
    def of_tensor(cls, images: Tensor) -> "NativeStore":
        """Images of one size (N, C, H, W) as a NativeStore over the same memory."""
        n, per = len(images), math.prod(images.shape[1:])
        shapes = np.tile(np.array(images.shape[1:], dtype=np.int64), (n, 1))
        return cls(images.contiguous().reshape(-1), np.arange(n, dtype=np.int64) * per, shapes)

    def __repr__(self) -> str:
        return f"NativeStore({len(self)} images of their own sizes)"


def pick(images, idx: Tensor) -> list[Tensor]:
    """Images `idx` of a split of images of different sizes, as a list of (C, H_i, W_i): views of a
    NativeStore or a list, or the images a store that decodes when read decodes together (in parallel)."""
    if isinstance(images, (list, NativeStore)):
        return [images[i] for i in idx.tolist()]
    return list(images[idx])


def as_tensor(images: Tensor | ImageStore) -> Tensor:
    """Images of one size as a single (N, C, H, W) tensor, for code that needs all of them at once."""
    return images if isinstance(images, Tensor) else images.materialize()


@dataclass
class ImageSet:
    """A split: uint8 images (N, C, H, W) (an ImageStore, or a tensor), int64 labels (N,), class names."""
    images: Tensor | ImageStore
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Tensor) -> "ImageSet":
        """The images `idx` (indices or a bool mask): a store composes the index and copies no pixels;
        an in-memory tensor is indexed (a copy of the rows, as small named sources are)."""
        images = self.images.subset(idx) if hasattr(self.images, "subset") else self.images[idx]
        return ImageSet(images, self.labels[idx], self.classes)


@dataclass
class NativeSet:
    """A split of images of different sizes: a NativeStore (or a list) of uint8 (C, H_i, W_i), int64
    labels (N,), class names."""
    images: NativeStore | list[Tensor]
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Tensor) -> "NativeSet":
        if hasattr(self.images, "subset"):
            return NativeSet(self.images.subset(idx), self.labels[idx], self.classes)
        rows = _rows(idx, len(self)).tolist()
        return NativeSet([self.images[i] for i in rows], self.labels[idx], self.classes)

    @property
    def in_chans(self) -> int:
        return getattr(self.images, "channels", None) or self.images[0].shape[0]   # a store may know it undecoded
