"""Hugging Face `datasets` on disk, streamed: images decoded when a batch asks for them.

    --data PATH    a .parquet file; a folder of parquet files, split by file or folder name as
                   `datasets` splits them (train-*.parquet, data/validation-00000-of-00001.parquet,
                   test/0000.parquet; files named by no split are all "train"); or a folder written
                   by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`

Nothing is decoded or read whole up front. A save_to_disk folder's arrow files are memory-mapped
(any row is read on its own); a parquet file is read by row groups (`ParquetFile(memory_map=True)`,
`read_row_group` per batch, found through an index of row-group offsets) kept in a small
least-recently-used cache. Only the label column is read whole (one integer per image).

Columns: the image column (the `Image` feature: a struct {bytes, path}, or plain binary) and an
integer label column (a `ClassLabel` gives the class names; plain integers are named "0".."K-1").
Found by name (image / img, label / labels / fine_label) or feature type, or named by
`image_column` / `label_column`.

A split's images are an `HFImages` store: `store[idx]` decodes rows (PIL, in a small thread pool)
to uint8 (B, C, H, W), each resized to the run's `img_size` as the ImageFolder reader resizes (bicubic
after .convert), or kept at its own size when all are alike; at native resolution `store[i]` is one
image (C, H_i, W_i) scaled down to `max_side`. C is 1 when every probed image is grayscale, else 3.
Corrupt images, missing columns, non-integer labels and images of different sizes are found on a
sample before training starts (and on any later row as it is decoded), as one-line PixformerErrors.
"""
from __future__ import annotations

import io
import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import PixformerError
from ..files import read_json_object
from .cache import decode_image, different_sizes
from .native import check_native_size
from .store import ImageSet, NativeSet

IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels", "fine_label")
# `datasets`' split keywords: a file or folder name holding one as a word (separated by - . _ space digits)
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "dev": "val",
               "val": "val", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
PROBE_HEADERS = 256         # images whose size and mode are read before training (per split)
PROBE_DECODES = 64          # of them, decoded in full before training (per split)


def is_hf_dataset(path: str | Path) -> bool:
    """Whether `path` is one of the layouts this module reads (see the module doc)."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".parquet"
    if not p.is_dir():
        return False
    return ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()   # parquet files at the top
            or any(p.glob("*.parquet")) or any(p.glob("*/*.parquet")))                # or one folder down (data/)


# ---- rows of one split's image column ------------------------------------------------------
def _items(column) -> list[tuple[bytes | None, str | None]]:
    """(bytes, path) per row of an image column (an Image struct or plain binary), as Python values."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if pa.types.is_struct(column.type):
        data = pc.struct_field(column, "bytes").to_pylist()
        has_path = column.type.get_field_index("path") >= 0
        paths = pc.struct_field(column, "path").to_pylist() if has_path else [None] * len(data)
        return list(zip(data, paths))
    return [(b, None) for b in column.to_pylist()]


class ArrowRows:
    """The image column of a save_to_disk split: its arrow files memory-mapped, any row read alone."""

    def __init__(self, files: list[Path], column: str):
        import pyarrow as pa
        self.files = files
        tables = [_read_arrow(f) for f in files]
        self.column = pa.chunked_array([c for t in tables for c in t.column(column).chunks],
                                       type=tables[0].schema.field(column).type)
        self.file_starts = np.cumsum([0] + [t.num_rows for t in tables])

    def __len__(self) -> int:
        return int(self.file_starts[-1])

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        """The unit a read costs: one row."""
        return rows

    def take(self, rows: np.ndarray) -> list[tuple[bytes | None, str | None]]:
        import pyarrow as pa
        return _items(self.column.take(pa.array(rows, type=pa.int64())))

    def where(self, row: int) -> str:
        f = int(np.searchsorted(self.file_starts, row, side="right")) - 1
        return f"{self.files[f]} row {row - int(self.file_starts[f])}"


class ParquetRows:
    """The image column of parquet files, read by row group: an index of row-group offsets, a
    memory-mapped ParquetFile per thread, and the row groups read last kept in an LRU cache of at
    most `cache_bytes` (always at least the one being read)."""

    def __init__(self, files: list[Path], column: str, cache_bytes: int = 256 << 20):
        import pyarrow.parquet as pq
        self.files, self.column, self.cache_bytes = files, column, cache_bytes
        self.groups, sizes, per_file = [], [], []
        for fi, f in enumerate(files):
            meta = pq.ParquetFile(f, memory_map=True).metadata
            per_file.append(meta.num_rows)
            for rg in range(meta.num_row_groups):
                self.groups.append((fi, rg))
                sizes.append(meta.row_group(rg).num_rows)
        self.starts = np.cumsum([0] + sizes)
        self.file_starts = np.cumsum([0] + per_file)
        self.cache: OrderedDict = OrderedDict()
        self.cached = 0
        self.reads = 0                              # row groups read from disk (a test counts them)
        self.lock = threading.Lock()
        self.local = threading.local()              # each thread its own ParquetFile handles

    def __len__(self) -> int:
        return int(self.starts[-1])

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        """The unit a read costs: the row group each row is in."""
        return np.searchsorted(self.starts, rows, side="right") - 1

    def _group(self, g: int):
        with self.lock:
            if g in self.cache:
                self.cache.move_to_end(g)
                return self.cache[g]
        import pyarrow.parquet as pq
        handles = self.local.__dict__.setdefault("files", {})
        fi, rg = self.groups[g]
        if fi not in handles:
            handles[fi] = pq.ParquetFile(self.files[fi], memory_map=True)
        column = handles[fi].read_row_group(rg, columns=[self.column]).column(0).combine_chunks()
        with self.lock:
            self.reads += 1
            if g not in self.cache:
                self.cache[g] = column
                self.cached += column.nbytes
            while self.cached > self.cache_bytes and len(self.cache) > 1:
                self.cached -= self.cache.popitem(last=False)[1].nbytes
        return column

    def take(self, rows: np.ndarray) -> list[tuple[bytes | None, str | None]]:
        import pyarrow as pa
        groups = self.group_of(rows)
        out: list = [None] * len(rows)
        for g in np.unique(groups):
            sel = np.flatnonzero(groups == g)
            part = self._group(int(g)).take(pa.array(rows[sel] - self.starts[g], type=pa.int64()))
            for k, item in zip(sel.tolist(), _items(part)):
                out[k] = item
        return out

    def where(self, row: int) -> str:
        f = int(np.searchsorted(self.file_starts, row, side="right")) - 1
        return f"{self.files[f]} row {row - int(self.file_starts[f])}"


def _read_arrow(path: Path):
    """A save_to_disk arrow file (an IPC stream), memory-mapped: the table's buffers point into the map."""
    import pyarrow as pa
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise PixformerError(f"{path} is not a readable arrow file ({e})") from None
    except OSError as e:
        raise PixformerError(f"{path} is not a readable arrow file ({e})") from None


def grouped_sample(groups: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most `limit` of the rows whose read units are `groups`: whole units in
    a seeded random order until `limit` rows are taken, so a sample of a parquet split reads few row
    groups (an arrow split's unit is one row, so its sample is uniform)."""
    if len(groups) <= limit:
        return np.arange(len(groups))
    units, inverse = np.unique(groups, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(units))
    rank = np.empty(len(units), dtype=np.int64)
    rank[order] = np.arange(len(units))
    picked = np.argsort(rank[inverse], kind="stable")[:limit]
    return np.sort(picked)


# ---- the store -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How rows are decoded: PIL mode ("RGB" / "L"), a fixed (H, W) to resize to or to require
    (`resize` False: images kept at their size, which must be `size`), or native (scaled to max_side)."""
    mode: str
    size: tuple[int, int] | None
    resize: bool
    native: bool = False
    max_side: int | None = None
    source: str = ""

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


class Decoder:
    """Decodes image rows of one split (shared by its subsets): the rows, the layout, and a thread
    pool started on first use (PIL releases the GIL while decoding, so a batch decodes in parallel)."""

    def __init__(self, rows: ArrowRows | ParquetRows, layout: Layout, root: Path, threads: int):
        self.rows, self.layout, self.root, self.threads = rows, layout, root, max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pixformer-decode")
            return self._pool

    def open(self, item: tuple[bytes | None, str | None], row: int):
        """A PIL image (not yet decoded) from a row's bytes, or from its path when it holds none."""
        from PIL import Image
        data, path = item
        if data is None:
            if not path:
                raise PixformerError(f"{self.rows.where(row)}: the image is empty (neither bytes nor a path)")
            p = Path(path) if os.path.isabs(path) else self.root / path
            try:
                data = p.read_bytes()
            except OSError as e:
                raise PixformerError(f"{self.rows.where(row)}: its image file {p} cannot be read ({e})") from None
        return Image.open(io.BytesIO(data))

    def decode(self, item: tuple[bytes | None, str | None], row: int) -> Tensor:
        """One row -> uint8 (C, H, W) as the layout says; a one-line PixformerError if it cannot."""
        lay = self.layout
        try:                                      # the decode cache's decoder: draft, 16-bit scaling, bicubic
            arr = decode_image(self.open(item, row), lay.size if lay.resize and not lay.native else None,
                               lay.max_side if lay.native else None, lay.mode)
        except PixformerError:
            raise
        except Exception as e:  # PIL raises many types for corrupt images
            raise PixformerError(f"cannot decode the image at {self.rows.where(row)} ({type(e).__name__}: {e})") from None
        if not lay.native and tuple(arr.shape[1:]) != tuple(lay.size):
            raise PixformerError(different_sizes(lay.source, lay.size, "the first image", tuple(arr.shape[1:]),
                                                 self.rows.where(row)))
        return torch.from_numpy(arr)

    def decode_rows(self, rows: np.ndarray, out: Tensor | None = None) -> list[Tensor] | Tensor:
        """Rows -> a list of images, or written into `out` (B, C, H, W); decoded in the pool."""
        items = self.rows.take(rows)

        def one(k: int) -> Tensor:
            img = self.decode(items[k], int(rows[k]))
            if out is not None:
                out[k] = img
            return img
        if self.threads == 1 or len(rows) < 2:
            images = [one(k) for k in range(len(rows))]
        else:
            images = list(self.pool().map(one, range(len(rows))))
        return out if out is not None else images


class HFImages:
    """A split's images, decoded when indexed. The store protocol: len, `shape` (N, C, H, W) (not at
    native resolution), `store[idx]` for an int (one image (C, H, W)), a slice, a list, a numpy array
    or an int64 / bool tensor (uint8 (B, C, H, W) in memory; at native resolution a list of images),
    `subset(idx)` (a view through composed indices, nothing copied or decoded), iteration, and
    `materialize()` as store.ImageStore has them (duck-typed: there is no base tensor to hold).
    `decodes_on_the_fly` marks a store whose every full pass decodes every image: statistics should
    be taken over `sample_indices()`. Thread-safe: any number of threads may index it at once."""
    decodes_on_the_fly = True
    dtype = torch.uint8

    def __init__(self, decoder: Decoder, index: np.ndarray | None = None):
        self.decoder = decoder
        self.index = np.arange(len(decoder.rows), dtype=np.int64) if index is None else index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def channels(self) -> int:
        return self.decoder.layout.channels

    @property
    def native(self) -> bool:
        return self.decoder.layout.native

    @property
    def shape(self) -> torch.Size:
        lay = self.decoder.layout
        if lay.native:
            raise AttributeError("images at native resolution have no common shape")
        return torch.Size((len(self), lay.channels, *lay.size))

    def positions(self, idx) -> np.ndarray:
        """Any index (slice, list, numpy array, int64 or bool tensor) -> positions into this store."""
        if isinstance(idx, slice):
            return np.arange(len(self))[idx]
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if len(idx) != len(self):
                raise IndexError(f"a mask of {len(idx)} for {len(self)} images")
            return np.flatnonzero(idx)
        return np.arange(len(self))[idx.astype(np.int64)]    # bounds-checked, negatives wrap

    def __getitem__(self, idx) -> Tensor | list[Tensor]:
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, Tensor) and idx.ndim == 0):
            i = int(idx)
            if not -len(self) <= i < len(self):
                raise IndexError(f"image {i} of {len(self)}")
            return self.decoder.decode_rows(self.index[[i]])[0]
        rows = self.index[self.positions(idx)]
        if self.native:
            return self.decoder.decode_rows(rows)
        out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8)
        return self.decoder.decode_rows(rows, out)

    def __iter__(self):
        for start in range(0, len(self), 256):
            yield from self[start: start + 256]

    def subset(self, idx) -> "HFImages":
        return HFImages(self.decoder, self.index[self.positions(idx)])

    @property
    def ndim(self) -> int:
        return 4

    @property
    def owned_bytes(self) -> int:
        """Memory this store holds: its row index (the images stay encoded on disk)."""
        return self.index.nbytes

    def materialize(self) -> Tensor:
        """All these images decoded into one (N, C, H, W) tensor: for callers that need the whole set at
        once (FID statistics, a pixel permutation); it decodes every image, training never calls it."""
        return self[:]

    def numpy(self) -> np.ndarray:
        return self.materialize().numpy()

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def sample_indices(self, limit: int = 10_000, seed: int = 0) -> Tensor:
        """Sorted positions of at most `limit` images, seeded; drawn by whole row groups for parquet
        (so a sample reads few of them), uniformly for arrow. What per-channel statistics should read."""
        return torch.from_numpy(grouped_sample(self.decoder.rows.group_of(self.index), limit, seed))

    def __repr__(self) -> str:
        lay = self.decoder.layout
        what = f"native, max side {lay.max_side}" if lay.native else f"{lay.channels}x{lay.size[0]}x{lay.size[1]}"
        return f"HFImages({len(self)} images of {lay.source}, {what})"


def split_of(relative: Path) -> str | None:
    """The split a parquet file's path (relative to the dataset folder) names, as `datasets` reads it:
    the file name, else the nearest folder, holding a split keyword as a word; None if none does."""
    for part in [relative.name, *reversed(relative.parent.parts)]:
        for word in re.split(r"[-._ 0-9]+", part.lower()):
            if word in SPLIT_WORDS:
                return SPLIT_WORDS[word]
    return None


@dataclass
class SplitFiles:
    kind: str                   # "parquet" or "arrow"
    files: list[Path]
    features: dict              # the `datasets` features, {} if none were saved


def _features_from_schema(schema) -> dict:
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(meta)["info"]["features"] if meta else {}
    except (ValueError, KeyError, TypeError):
        return {}


def _saved_dataset(folder: Path, where: Path) -> SplitFiles:
    """The arrow files and features of one save_to_disk Dataset folder."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise PixformerError(f"{where} lists a split in {folder}, which holds no saved dataset (no state.json)")
    state = read_json_object(state_file, "a save_to_disk state file")
    try:
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (KeyError, TypeError) as e:
        raise PixformerError(f"{state_file} is not a save_to_disk state file ({e})") from None
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise PixformerError(f"{state_file} names arrow file {missing[0] if missing else '(none)'}, which is missing")
    info = folder / "dataset_info.json"
    features = read_json_object(info, "a dataset_info file").get("features") or {} if info.is_file() else {}
    return SplitFiles("arrow", files, features if isinstance(features, dict) else {})


def find_splits(path: Path) -> dict[str, SplitFiles]:
    """The splits of a dataset on disk (train / val / test) and the files of each."""
    if not path.exists():
        raise PixformerError(f"dataset path {path} does not exist")
    if path.is_file():
        return {split_of(Path(path.name)) or "train": SplitFiles("parquet", [path], {})}
    if (path / "dataset_dict.json").is_file():
        names = read_json_object(path / "dataset_dict.json", "a DatasetDict's split list").get("splits")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PixformerError(f"{path / 'dataset_dict.json'} is not a DatasetDict's split list (no list of "
                                 "split names under 'splits')")
        found = {}
        for name in names:
            split = SPLIT_WORDS.get(name.lower())
            if split is None:
                continue                        # e.g. "unsupervised": not a split pixformer trains or tests on
            if split in found:
                raise PixformerError(f"{path} has two {split} splits ({name} and another); keep one")
            found[split] = _saved_dataset(path / name, path / "dataset_dict.json")
        if not found:
            raise PixformerError(f"{path / 'dataset_dict.json'} lists splits {names}, none of them train, "
                                 "validation or test")
        return found
    if (path / "state.json").is_file():
        state_split = str(read_json_object(path / "state.json", "a save_to_disk state file").get("_split") or "")
        return {SPLIT_WORDS.get(state_split.lower(), "train"): _saved_dataset(path, path)}
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise PixformerError(f"{path} holds no parquet files and no save_to_disk dataset")
    named = {f: split_of(f.relative_to(path)) for f in files}
    if any(named.values()) and not all(named.values()):
        odd = next(f for f, s in named.items() if s is None)
        raise PixformerError(f"cannot tell the split of {odd}: name each parquet file (or its folder) by its "
                             "split (train-*, validation-*, test-*)")
    found: dict[str, SplitFiles] = {}
    for f, split in named.items():
        found.setdefault(split or "train", SplitFiles("parquet", [], {})).files.append(f)
    return found


def _pick_column(names: list[str], features: dict, explicit: str | None, usual: tuple[str, ...],
                 feature_type: str, what: str, keyword: str, where: Path) -> str:
    if explicit:
        if explicit not in names:
            raise PixformerError(f"{where} has no column {explicit!r} ({keyword}); its columns are {names}")
        return explicit
    for n in usual:
        if n in names:
            return n
    typed = [n for n in names if isinstance(features.get(n), dict) and features[n].get("_type") == feature_type]
    if len(typed) == 1:
        return typed[0]
    raise PixformerError(f"{where} has no {what} column (looked for {list(usual)} or one {feature_type} feature; "
                         f"columns {names}): name it with --{keyword.replace('_', '-')} ({keyword}= in Python)")


def _labels(sf: SplitFiles, column: str) -> np.ndarray:
    """A split's label column, whole (one integer per row), checked to be integers with none missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    parts = []
    for f in sf.files:
        if sf.kind == "parquet":
            col = pq.read_table(f, columns=[column], memory_map=True).column(0)
        else:
            col = _read_arrow(f).column(column)
        if not pa.types.is_integer(col.type):
            raise PixformerError(f"{f}: label column {column!r} holds {col.type}, not integers or a ClassLabel "
                                 "(name another with --label-column, label_column= in Python)")
        if col.null_count:
            raise PixformerError(f"{f}: label column {column!r} has {col.null_count} missing label(s)")
        parts.append(col.to_numpy().astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class SplitTable:
    rows: ArrowRows | ParquetRows
    labels: np.ndarray
    features: dict
    image_column: str
    label_column: str
    where: Path


def _open_split(sf: SplitFiles, image_column: str | None, label_column: str | None,
                cache_bytes: int) -> SplitTable:
    import pyarrow as pa
    import pyarrow.parquet as pq
    first = sf.files[0]
    try:
        schema = pq.read_schema(first, memory_map=True) if sf.kind == "parquet" else _read_arrow(first).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise PixformerError(f"{first} is not a readable parquet file ({e})") from None
    features = _features_from_schema(schema) or sf.features
    image = _pick_column(schema.names, features, image_column, IMAGE_NAMES, "Image", "image", "image_column", first)
    label = _pick_column(schema.names, features, label_column, LABEL_NAMES, "ClassLabel", "label", "label_column",
                         first)
    t = schema.field(image).type
    binary = lambda u: pa.types.is_binary(u) or pa.types.is_large_binary(u)  # noqa: E731
    if pa.types.is_struct(t):
        encoded = t.get_field_index("bytes") >= 0 and binary(t.field(t.get_field_index("bytes")).type)
    else:
        encoded = binary(t)
    if not encoded:
        raise PixformerError(f"{first}: image column {image!r} holds {t}, not encoded images (an Image feature "
                             "or raw bytes)")
    for f in sf.files[1:]:
        names = (pq.read_schema(f, memory_map=True) if sf.kind == "parquet" else _read_arrow(f).schema).names
        if image not in names or label not in names:
            raise PixformerError(f"{f} lacks column {image if image not in names else label!r}, which {first} has")
    labels = _labels(sf, label)
    rows = ParquetRows(sf.files, image, cache_bytes) if sf.kind == "parquet" else ArrowRows(sf.files, image)
    return SplitTable(rows, labels, features, image, label, first)


def _class_names(tables: dict[str, SplitTable]) -> list[str]:
    """ClassLabel names (the same in every split that declares them), else "0".."K-1"; every label
    checked to be one of them."""
    declared = {s: t.features[t.label_column].get("names") for s, t in tables.items()
                if isinstance(t.features.get(t.label_column), dict)
                and t.features[t.label_column].get("_type") == "ClassLabel"}
    named = [n for n in declared.values() if n]
    if named and any(n != named[0] for n in named):
        raise PixformerError(f"the splits' ClassLabel names differ ({', '.join(f'{s}: {n}' for s, n in declared.items())})")
    top = max((int(t.labels.max()) for t in tables.values() if len(t.labels)), default=-1)
    classes = [str(c) for c in named[0]] if named else [str(i) for i in range(top + 1)]
    for t in tables.values():
        bad = np.flatnonzero((t.labels < 0) | (t.labels >= len(classes)))
        if len(bad):
            raise PixformerError(f"{t.rows.where(int(bad[0]))}: label {int(t.labels[bad[0]])} is not one of the "
                                 f"{len(classes)} classes 0..{len(classes) - 1} (an unlabelled split?)")
    return classes


# ---- the reader ------------------------------------------------------------------------------
def load_hf(path: str | Path, img_size: tuple[int, int] | None = None, native: bool = False,
            max_side: int | None = None, image_column: str | None = None, label_column: str | None = None,
            decode_threads: int | None = None, row_group_cache_mb: int = 256,
            skip_bad_images: bool = False) -> dict[str, ImageSet | NativeSet]:
    """A Hugging Face dataset on disk (see the module doc) -> its splits by name ("train", "val",
    "test"), each an ImageSet over an HFImages store (images resized to `img_size`, or all of one size without it) or,
    with `native`, a NativeSet over one (each image at its size, scaled down to `max_side`). Nothing is
    decoded but a probe of each split (a sample's headers and a few whole images), so bad input is
    a PixformerError here rather than mid-training. `decode_threads` (default: the CPU count, at
    most 8) decode a batch in parallel; `row_group_cache_mb` bounds the parquet row groups kept."""
    check_native_size(native, img_size)
    if skip_bad_images:
        raise PixformerError(f"{path} is decoded on the fly, so bad images cannot be skipped up front: "
                             "drop --skip-bad-images (a bad image is reported when it is read)")
    path = Path(path)
    tables = {s: _open_split(sf, image_column, label_column, row_group_cache_mb << 20)
              for s, sf in find_splits(path).items()}
    classes = _class_names(tables)
    root = path.parent if path.is_file() else path

    # probe each split: sizes and modes of a sample's headers, then a few decoded in full
    probes = {}
    for s, t in tables.items():
        rows = grouped_sample(t.rows.group_of(np.arange(len(t.rows))), PROBE_HEADERS)
        probe = Decoder(t.rows, Layout("RGB", None, False, source=str(path)), root, 1)
        found = []
        for chunk in np.array_split(rows, -(-len(rows) // 64)) if len(rows) else []:   # a few rows in memory at once
            for r, item in zip(chunk.tolist(), t.rows.take(chunk)):
                try:
                    with probe.open(item, r) as im:
                        found.append((im.mode, (im.height, im.width), r))
                except PixformerError:
                    raise
                except Exception as e:
                    raise PixformerError(f"cannot decode the image at {t.rows.where(r)} ({type(e).__name__}: {e})") from None
        probes[s] = found
    modes = {m for found in probes.values() for m, _, _ in found}
    mode = "L" if modes and modes <= GRAY_MODES else "RGB"
    if native:
        size, resize = None, False
    elif img_size is not None:
        size, resize = tuple(img_size), True
    else:
        first = next(((found[0], s) for s, found in probes.items() if found), None)
        if first is None:
            raise PixformerError(f"{path} holds no images")
        (_, size, r0), s0 = first
        for s, found in probes.items():
            for _, hw, r in found:
                if hw != size:
                    raise PixformerError(different_sizes(str(path), size, tables[s0].rows.where(r0), hw,
                                                         tables[s].rows.where(r)))
        resize = False
    threads = decode_threads or min(8, os.cpu_count() or 1)
    out = {}
    for s, t in tables.items():
        decoder = Decoder(t.rows, Layout(mode, size, resize, native, max_side, str(path)), root, threads)
        decoder.decode_rows(np.asarray([r for _, _, r in probes[s][:PROBE_DECODES]], dtype=np.int64))
        images = HFImages(decoder)
        labels = torch.from_numpy(t.labels)
        out[s] = NativeSet(images, labels, classes) if native else ImageSet(images, labels, classes)
    return out
