"""Which images a run trains, validates and tests on: one function for every command.

    train  the source's train split (or all of a plain class-folder tree)
    val    the source's own val split, or else a seeded hold-out of train (--val-fraction, seed 0)
    test   the source's test split, if it has one; evaluated once at the end of a run, never
           used to choose anything during training

The same hold-out is drawn by `train`, `eval --split val`, `analyze` and scripts/export_split.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import PixformerError
from .ablations import permuted
from .native import is_native
from .sources import NAMED_SOURCES, load_source
from .store import ImageSet, ImageStore, NativeSet, NativeStore


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    val_from: str               # "val split" (the source's own) or "held out of train"

    def get(self, name: str) -> ImageSet:
        """One split by name (train | val | test), or a clear error when the source has no such split."""
        if name not in ("train", "val", "test"):
            raise PixformerError(f"split must be train, val or test, got {name!r}")
        split = getattr(self, name)
        if split is None:
            raise PixformerError("this source has no test split (no test/ folder, no official test set); "
                                 "use --split val for the images held out of training")
        return split


def holdout(n: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic (train_idx, val_idx) split of range(n): a seeded permutation, the first
    round(n * fraction) indices held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = round(n * fraction)
    return perm[k:].sort().values, perm[:k].sort().values


def resolve_splits(found: dict[str, ImageSet], val_fraction: float, source: str = "the data") -> Splits:
    """The train / val / test splits of a source from the splits its reader found (see the module doc)."""
    train = found.get("train", found.get("all"))
    if train is None:
        raise PixformerError(f"{source} has no training images: it holds only {sorted(found)} split folder(s); "
                             "expected train/ (or class folders at the top)")
    if len(train) == 0:
        raise PixformerError(f"{source} has an empty training set")
    if "val" in found:
        return Splits(train, found["val"], found.get("test"), "val split")
    if not 0 < val_fraction < 1:
        raise PixformerError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}: {source} "
                             "has no val split, so training validates on a held-out part of train")
    tr, va = holdout(len(train), val_fraction)
    if len(tr) == 0 or len(va) == 0:
        raise PixformerError(f"--val-fraction {val_fraction} of {len(train)} training images leaves "
                             f"{len(tr)} to train on and {len(va)} to validate on: choose a --val-fraction that leaves "
                             "both at least one")
    return Splits(train.subset(tr), train.subset(va), found.get("test"), "held out of train")


def source_id(source: str) -> str:
    """A data source as one comparable string: a named dataset's name, or a path made absolute."""
    return source.lower() if source.lower() in NAMED_SOURCES else str(Path(source).expanduser().resolve())


def channel_stats(images: Tensor | ImageStore | NativeStore | list[Tensor], chunk: int | None = None,
                  chunk_values: int = 1 << 20) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) (a tensor or a store), or of images of any
    sizes (C, H_i, W_i) (a NativeStore or a list: every pixel counts once), on the 0..1 scale. Exact
    integer sums over chunks of `chunk` images (default: about `chunk_values` pixel values a chunk),
    so neither a float copy of the whole set nor of a large chunk is ever made, and a mapped store
    is read once, a chunk at a time."""
    if isinstance(images, (Tensor, ImageStore)):
        step = chunk or max(1, chunk_values // max(1, math.prod(images.shape[1:])))
        parts = (images[i: i + step] for i in range(0, len(images), step))
    else:
        parts = _grouped(images, chunk, chunk_values)
    total = squares = None
    n = 0
    for part in parts:      # float64 sums of a chunk's integers are exact (< 2^53), then kept as integers
        x = (part.transpose(0, 1).reshape(part.shape[1], -1) if part.dim() == 4 else part).double()
        if total is None:
            total, squares = torch.zeros(len(x), dtype=torch.int64), torch.zeros(len(x), dtype=torch.int64)
        total += x.sum(1).long()
        squares += (x * x).sum(1).long()
        n += x.shape[1]
    if total is None:
        raise PixformerError("channel statistics need at least one image")
    mean = total.double() / (255.0 * n)
    var = (squares.double() / 255.0 ** 2 - n * mean * mean) / max(n - 1, 1)
    return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()


def _grouped(images, chunk: int | None, chunk_values: int):
    """Images of any sizes as (C, pixels) groups of `chunk` images (default: about `chunk_values` values)."""
    group, values = [], 0
    for im in images:
        group.append(im.reshape(im.shape[0], -1))
        values += im.numel()
        if len(group) == chunk or (chunk is None and values >= chunk_values):
            yield torch.cat(group, 1)
            group, values = [], 0
    if group:
        yield torch.cat(group, 1)


def run_split(state: dict[str, Any], source: str | None, root: str | None, split: str,
              max_side: int | None = None, workers: int | None = None,
              columns: tuple[str | None, str | None] = (None, None),
              skip_bad_images: bool | None = None, or_val: bool = False) -> tuple[ImageSet | NativeSet, str]:
    """The images `eval` and `analyze` score for a trained run (`state`: its state.json): one split of
    `source` (default: the run's own data), laid out as the run trained (image size, pixel
    permutation; a native-resolution run's images at their own sizes, scaled down to `max_side`,
    default the run's; an image folder decoded by `workers` processes, None: every core). A plain
    class-folder tree that is not the run's training source is a folder of test images; the training
    source never is. The run's own data is found by the absolute path stored when it trained
    (`data.source`), so from any working directory. `columns`: a Hugging Face dataset's image and label
    columns, where they are not the run's; `skip_bad_images`: None, the run's setting; `or_val`: the
    test split asked of the run's own data that has none gives its validation split instead of an error.
    The run's own source is loaded as training loaded it (the same decode-cache entry: a run trained at
    the images' own size is not decoded again at that size); another is resized to the run's size."""
    tc, info = state["train_config"], state["data"]
    source = source or info.get("source") or tc["data"]          # runs of 0.1 stored only what was typed
    native = is_native(tc)
    own = source_id(source) == info.get("source", source_id(tc["data"]))
    if native:
        size = None
    elif own:                                                    # as training loaded it
        size = (tc["img_size"], tc["img_size"]) if tc.get("img_size") else None
    else:
        size = tuple(info["img_size"])
    skip = tc.get("skip_bad_images", False) if skip_bad_images is None else skip_bad_images
    found = load_source(source, root or tc.get("data_root"), size, skip, native=native,
                        max_side=max_side or tc.get("max_side"), workers=workers,
                        image_column=columns[0] or tc.get("image_column"),
                        label_column=columns[1] or tc.get("label_column"))
    if set(found) == {"all"} and not own:
        if split != "test":
            raise PixformerError(f"{source} is a plain class-folder tree the run did not train on: all its images "
                                 "are test images (--split test)")
        splits = Splits(found["all"], found["all"], found["all"], "")
    else:
        splits = resolve_splits(found, info["val_fraction"], source)
        if split == "test" and splits.test is None and own and or_val:
            split = "val"
        elif split == "test" and splits.test is None and own:
            raise PixformerError(f"{source} has no test split, and the run trained on the rest of it: "
                                 "use --split val for the images it held out")
    data = splits.get(split)
    chans = data.in_chans if native else data.images.shape[1]
    if chans != info["in_chans"]:
        raise PixformerError(f"{source} has {chans} channels; the model was trained on {info['in_chans']}")
    if not native and tuple(data.images.shape[2:]) != tuple(info["img_size"]):   # the run's own, changed on disk
        raise PixformerError(f"{source} now holds {data.images.shape[2]}x{data.images.shape[3]} images; the model "
                             f"was trained on {info['img_size'][0]}x{info['img_size'][1]}")
    return (data if native else permuted(data, tc)), f"{source} [{split}]"
