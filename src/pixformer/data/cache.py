"""Decode once, map everywhere: cache entries built by one process per machine and memory-mapped by all.

A cache entry is a folder of .npy files (plus meta.json and a manifest). `build_once(path, build)`
returns it mapped copy-on-write (np.load(mmap_mode="c")): pages come from the page cache and are
shared by every process mapping the file, so a rank's own (anonymous) memory does not grow with the
data, and torch sees the arrays without a copy. It is built at most once per machine: an fcntl lock
per entry (`<path>.lock`) lets the first process build while the others block on the lock, then find
the finished entry and map it. This serves torchrun's local ranks and two separate runs alike, with
no collective (so no process-group timeout while one rank decodes for an hour). The builder writes
into a fresh temporary folder, renamed into place only when complete. An entry that fails its check
(a file missing, truncated, or differing in sampled blocks from the manifest written with it) is said
to be unreadable in one line and built again.

The image decode cache (`decode_splits`, `map_splits`) is such an entry: per split, fixed-size
images as one uint8 array (N, C, H, W) (`<split>.x.npy`), or images at their own sizes as one flat
uint8 buffer with each image's offset and (C, H, W); labels beside. Decoding runs over a pool of
processes (`workers`: None = every core this process may use, 1 = in this process), JPEGs decoded at
a reduced scale (PIL's draft mode) whenever the image is shrunk. Fixed-size images are written into
the array by the process that decodes them, so the parent's work does not grow with the pixels.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..errors import PixformerError
from ..files import as_created
from ..progress import Progress, notice
from .native import shrunk
from .store import ImageSet, ImageStore, NativeSet, NativeStore

CHUNK_IMAGES = 128           # images sent to a decoding worker at a time (at most): each chunk costs the
                             # parent a submit and a wakeup; 128 64x64 JPEGs are ~16 ms of a worker's time
                             # (one worker decoded ~8,000 a second in benchmarks/data_scale.py)
CHUNK_BYTES = 16 << 20       # ... or this many bytes of encoded images read from an archive
SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 16 << 10   # the manifest's digest: 64 blocks of 16 KiB spread over a file


# ---- build once, map everywhere --------------------------------------------------------------
class Unreadable(Exception):
    """A cache entry that does not pass its check (why, in the message)."""


@dataclass
class Entry:
    """A finished cache entry: its folder, its meta.json (or {}), and every <name>.npy mapped copy-on-write."""
    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]

    def tensor(self, name: str) -> Tensor:
        """The array `name` as a tensor over the mapped file (no copy; writes stay in this process)."""
        return torch.from_numpy(self.arrays[name])


@contextmanager
def locked(path: Path, lock: int, what: str):
    """Hold the machine-wide lock of the cache entry `path` (an fcntl lock on the open file `lock`,
    `<path>.lock`); say so in one line when another process holds it and this one waits."""
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notice(f"waiting for another process building {what} ({path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)                        # closing the descriptor releases the lock


def sampled_digest(file: Path) -> str:
    """sha1 of a file's size and of SAMPLE_BLOCKS blocks spread evenly over it (all of it when small):
    reads at most 1 MiB, so checking a large entry stays cheap; catches truncation, a damaged header
    and damage in the sampled blocks, not every flipped byte."""
    size = file.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(file, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            h.update(f.read())
        else:
            for k in range(SAMPLE_BLOCKS):
                f.seek((size - SAMPLE_BLOCK) * k // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: each file's size and sampled digest, checked when the entry is opened."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    manifest = {n: {"size": (folder / n).stat().st_size, "digest": sampled_digest(folder / n)} for n in files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def open_entry(path: Path) -> Entry:
    """Check the entry at `path` against its manifest and map its arrays; Unreadable if it fails."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        wanted = {str(name): (int(want["size"]), str(want["digest"])) for name, want in manifest.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:   # not a manifest as written
        raise Unreadable(f"no readable manifest: {e}") from None
    for name, (size, digest) in wanted.items():
        file = path / name
        if not file.is_file():
            raise Unreadable(f"{name} is missing")
        if file.stat().st_size != size:
            raise Unreadable(f"{name} has {file.stat().st_size} bytes, {size} were written")
        if sampled_digest(file) != digest:
            raise Unreadable(f"{name} differs from what was written")
    arrays = {}
    for name in manifest:
        if name.endswith(".npy"):
            try:
                arrays[name[:-4]] = np.load(path / name, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise Unreadable(f"{name}: {e}") from None
    try:
        meta = json.loads((path / "meta.json").read_text()) if "meta.json" in manifest else {}
    except ValueError as e:
        raise Unreadable(f"meta.json: {e}") from None
    return Entry(path, meta, arrays)


def build_once(path: str | Path, build: Callable[[Path], dict[str, np.ndarray] | None],
               what: str = "a cache entry") -> Entry:
    """The cache entry (a folder) at `path`, mapped; built first by `build(tmp)` if it is absent or
    unreadable. `build` writes its files into the empty folder `tmp` (.npy arrays, e.g. filled in place
    through `new_array`, and optionally meta.json) and/or returns arrays by name, saved as <name>.npy.
    Exactly one process per machine builds a given entry; the others wait on its lock and map what it
    wrote (see the module doc). `what` names the entry in the lines said while waiting or rebuilding.
    A cache folder this process cannot write still serves the finished entries in it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path.parent / (path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        try:
            return open_entry(path)
        except Unreadable:
            raise PixformerError(f"cannot write {what} in {path.parent} ({e.strerror}): set PIXFORMER_CACHE to a "
                                 "writable folder") from None
    with locked(path, lock, what):
        if path.exists():
            try:
                return open_entry(path)
            except Unreadable as e:
                notice(f"{what} at {path} is unreadable ({e}): building it again")
                aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".bad-"))
                os.replace(path, aside / "entry")    # processes that mapped it keep their mapping
                shutil.rmtree(aside, ignore_errors=True)
        for stale in path.parent.glob(path.name + ".tmp-*"):   # left by a builder that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
        try:
            for name, array in (build(tmp) or {}).items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            write_manifest(tmp)
            _sync(tmp)                               # the bytes on disk before the rename makes them an entry
            os.rename(as_created(tmp), path)
            _sync_folder(path.parent)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise PixformerError(f"no space left for {what} in {path.parent}: free some, or set "
                                     "PIXFORMER_CACHE to a folder with room") from None
            raise
        return open_entry(path)


def _sync(folder: Path) -> None:
    """Every file in `folder` (written, or filled through a mapping) and the folder itself flushed to disk:
    after a power loss an entry is whole or absent, never a sized file of zeroed pages."""
    for file in folder.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    """A folder's entries (a rename, a new file) flushed to disk, where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                                  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def new_array(file: Path, shape: tuple[int, ...], dtype=np.uint8) -> np.memmap:
    """A .npy file of `shape` mapped for filling in place, its disk space reserved first: a full disk
    is an error here, not a crash (SIGBUS) while writing through the mapping later."""
    array = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(file, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return array


def npy_header(shape: tuple[int, ...], dtype=np.uint8) -> bytes:
    """A .npy header of a fixed 128 bytes, so it can be written after the data it describes."""
    text = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + (text.ljust(117) + "\n").encode("latin1")


class FlatWriter:
    """A 1-D uint8 .npy file appended to piece by piece (images of different sizes): each `append`
    returns the piece's offset; `close` writes the header with the final length."""

    def __init__(self, file: Path):
        self.f = open(file, "wb")
        self.f.write(npy_header((0,)))
        self.n = 0

    def append(self, array: np.ndarray) -> int:
        offset = self.n
        self.f.write(array.tobytes())
        self.n += array.size
        return offset

    def close(self) -> None:
        self.f.seek(0)
        self.f.write(npy_header((self.n,)))
        self.f.close()


# ---- decoding images, in parallel ------------------------------------------------------------
def worker_count(workers: int | None) -> int:
    """Decoding processes: all cores this process may run on (None), or the number asked for."""
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(workers, int) or workers < 1:
        raise PixformerError(f"--workers must be a whole number >= 1 (or unset for every core), got {workers!r}")
    return workers


def eight_bit(im):
    """A PIL image of more than 8 bits per value as an 8-bit grayscale one ("L"), scaled rather than
    clipped (PIL's own convert clips every value above 255 to white): 16-bit values (PNG's "I;16",
    or "I" within 0..65,535) by 1/257, so 65,535 is 255; other integer or float values (mode "F", 32-bit
    "I") by their maximum, negatives as 0. Images of 8 bits per value are returned as they are."""
    from PIL import Image
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    values = np.asarray(im, dtype=np.float64)
    sixteen = im.mode.startswith("I;16") or (im.mode == "I" and values.size > 0 and 0 <= values.min()
                                              and values.max() <= 65535)
    top = 65535.0 if sixteen else max(float(values.max(initial=0.0)), 1e-12)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def decode_image(src, size: tuple[int, int] | None, max_side: int | None, mode: str = "RGB") -> np.ndarray:
    """Encoded image bytes, a file path or an opened PIL image -> uint8 (C, H, W) in `mode` ("RGB": 3
    channels, "L": 1): resized to `size` (H, W) if given, else scaled down so its longer side is at most
    `max_side`, else as stored; bicubic. A JPEG that is shrunk is decoded at a reduced scale (draft
    mode: 1/2, 1/4 or 1/8, never below the target size); an image of 16 bits per value is scaled to 8
    (eight_bit). The one decoder of image files: the decode cache, Hugging Face datasets, predict."""
    from PIL import Image
    im = src if hasattr(src, "getbands") else Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    with im:
        w, h = im.size
        th, tw = size if size else shrunk(h, w, max_side)
        if (tw, th) != (w, h) and tw <= w and th <= h:
            im.draft(mode, (tw, th))
        im = eight_bit(im).convert(mode)
        if im.size != (tw, th):
            im = im.resize((tw, th), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)                       # read-only: copied below if not transposed
        return np.require(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1), requirements=["C", "W"])


def different_sizes(source: str, size, first: str, other, at: str) -> str:
    """The one-line error for a source whose images are not all of one size (`size` of image `first`,
    `other` of image `at`) when no size or budget was asked for."""
    return (f"{source} holds images of different sizes (height x width: {size[0]}x{size[1]} {first}, "
            f"{other[0]}x{other[1]} {at}); pass --img-size N to resize them all to NxN, or --max-side S / "
            "--max-tokens N to train at native resolution")


def failure(e: Exception) -> str:
    """The error text of an image that cannot be decoded (PIL raises many types for corrupt files)."""
    return f"{type(e).__name__}: {e}"


def decode_chunk(chunk: list[tuple[int, bytes | str]], size, max_side) -> tuple[list[tuple[int, tuple | str]], bytes]:
    """Decode a chunk of (position, source): each position with its image's (C, H, W), or the error
    text of an image that cannot be decoded; and all the pixels in one buffer (one object to send
    back from a worker, not one per image). For images of different sizes; see decode_into."""
    shapes, pixels = [], []
    for pos, src in chunk:
        try:
            arr = decode_image(src, size, max_side)
        except Exception as e:
            shapes.append((pos, failure(e)))
            continue
        shapes.append((pos, arr.shape))
        pixels.append(memoryview(arr).cast("B"))
    return shapes, b"".join(pixels)


def unpacked(result: tuple[list[tuple[int, tuple | str]], bytes]) -> list[tuple[int, np.ndarray | str]]:
    """decode_chunk's result as (position, array or error text), the arrays views of its buffer."""
    (shapes, pixels), out, at = result, [], 0
    for pos, shape in shapes:
        if isinstance(shape, str):
            out.append((pos, shape))
            continue
        n = math.prod(shape)
        out.append((pos, np.frombuffer(pixels, np.uint8, n, at).reshape(shape)))
        at += n
    return out


@dataclass(frozen=True)
class Rows:
    """Where images of one shape go when each decoder writes them itself (decode_into): row `r` of
    split `s` is the `math.prod(shape)` bytes at `offsets[s] + r * math.prod(shape)` of the file
    `files[s]` (a .npy made by new_array, its space reserved). Small, so it is sent with each chunk."""
    shape: tuple[int, int, int]
    files: dict[str, str]
    offsets: dict[str, int]


def write_rows(fd: int, arrays: list[np.ndarray], at: int) -> None:
    """Write `arrays` (C-contiguous) one after another at byte `at` of the open file `fd`: in one
    pwritev where there is one (one system call for a run of rows, not one per image); a short
    write is carried on, not lost."""
    views = [memoryview(a).cast("B") for a in arrays]
    while views:
        done = os.pwritev(fd, views, at) if hasattr(os, "pwritev") else os.pwrite(fd, views[0], at)
        at += done
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if done:
            views[0] = views[0][done:]


def decode_into(chunk: list[tuple[int, bytes | str, str, int]], size, max_side, rows: Rows) -> list[tuple[int, tuple | str]]:
    """Decode a chunk of (position, source, split, row), writing each image of `rows.shape` straight into
    its row of its split's file (images of consecutive rows together, write_rows): each position comes
    back with its image's (C, H, W) or error text, and no pixels. Sending every image back through a
    pipe for the parent to copy into place made the parent a third process busy with pixels on the
    cores the decoders need. An image of another shape is not written; its shape tells the parent why."""
    row_bytes = math.prod(rows.shape)
    files: dict[str, int] = {}                 # split -> open descriptor, for this chunk
    run: list[np.ndarray] = []                 # decoded images of consecutive rows, not yet written
    run_split, run_row, out = None, 0, []

    def flush() -> None:
        if run:
            if run_split not in files:
                files[run_split] = os.open(rows.files[run_split], os.O_WRONLY)
            write_rows(files[run_split], run, rows.offsets[run_split] + run_row * row_bytes)
            run.clear()
    try:
        for pos, src, split, row in chunk:
            try:
                arr = decode_image(src, size, max_side)
            except Exception as e:
                out.append((pos, failure(e)))
                continue
            out.append((pos, arr.shape))
            if arr.shape != rows.shape:
                continue
            if split != run_split or row != run_row + len(run):
                flush()
                run_split, run_row = split, row
            run.append(arr)
        flush()
    finally:
        for fd in files.values():
            os.close(fd)
    return out


def _chunks(jobs: Iterable[tuple[int, bytes | str]], per: int) -> Iterator[list]:
    chunk, size = [], 0
    for job in jobs:
        chunk.append(job)
        size += len(job[1]) if isinstance(job[1], bytes) else 0
        if len(chunk) >= per or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def pool_plan(total: int, workers: int | None) -> tuple[int, int]:
    """(processes, images a chunk) to decode `total` images with: a set that fits one chunk is decoded
    in this process, as is everything with workers=1."""
    n = worker_count(workers)
    per = min(CHUNK_IMAGES, max(16, math.ceil(total / (4 * n))))
    return (1 if total <= per else n), per


def decode_all(jobs: Iterable[tuple], total: int, size: tuple[int, int] | None, max_side: int | None,
               workers: int | None, desc: str, rows: Rows | None = None) -> Iterator[tuple[int, np.ndarray | tuple | str]]:
    """(position, array or error text) for every job (position, encoded bytes or a file path), in the
    order of the jobs; with `rows`, jobs are (position, source, split, row), each image is written
    into its row where it is decoded (decode_into), and what comes back is (position, shape or error
    text). Jobs are pulled lazily (an archive is read as the workers need it) and sent in chunks to
    the worker processes (pool_plan), at most two chunks per worker in flight."""
    n, per = pool_plan(total, workers)
    task, args = (decode_chunk, (size, max_side)) if rows is None else (decode_into, (size, max_side, rows))
    finish = unpacked if rows is None else list
    progress = Progress(total, desc)
    try:
        if n == 1:
            for chunk in _chunks(jobs, per):
                out = finish(task(chunk, *args))
                progress.update(len(out))
                yield from out
            return
        context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(n, mp_context=context, initializer=_worker_signals)
        pending: deque = deque()
        try:
            for chunk in _chunks(jobs, per):
                pending.append(pool.submit(task, chunk, *args))
                while len(pending) >= 2 * n:
                    out = finish(pending.popleft().result())
                    progress.update(len(out))
                    yield from out
            while pending:
                out = finish(pending.popleft().result())
                progress.update(len(out))
                yield from out
        except BrokenProcessPool:
            raise PixformerError(f"a decoding worker died while {desc} (out of memory?): try fewer --workers") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        progress.close()


def _worker_signals() -> None:
    """A decoding worker ends on SIGTERM as the system ends a process (a forked one would otherwise run the
    command's handler, meant for the main process)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---- the image decode cache ------------------------------------------------------------------
def decode_splits(out: Path, layout: list[tuple[str, str, str]], jobs: Iterable[tuple[int, bytes | str]], *,
                  size: tuple[int, int] | None, max_side: int | None, native: bool, skip_bad_images: bool,
                  workers: int | None, source: str, where: Callable[[str], str]) -> None:
    """Decode the images of `layout` (split, class, member), in sorted member order, into the cache
    entry folder `out`. `jobs` are (position in layout, bytes or file path) in whatever order the
    source is best read in (an archive's own); each image is put at its place in the sorted order,
    so the dataset's order does not depend on the archive's. `where(member)` names a member in errors.

    Images of one shape (`size` given, or all of the first image's) are written into each split's
    (N, C, H, W) array by the process that decodes them (_decode_equal); native images (each its own
    size) come back to this process, which appends them to a flat buffer in turn (_decode_native)."""
    places = Places(layout, skip_bad_images, where)
    desc, t0 = f"decoding {source}", time.perf_counter()
    index: dict[str, dict[str, np.ndarray]] = {}                     # a native split's offsets and shapes
    if native:
        index = _decode_native(out, places, jobs, size, max_side, workers, desc)
    else:
        _decode_equal(out, places, jobs, size, max_side, workers, desc, source)
    if places.bad:
        notice(f"skipped {len(places.bad)} unreadable image(s) in {source}, e.g. {places.bad[0]}")
    splits = _write_index(out, places, index, native)
    if not splits:
        raise PixformerError(f"no readable images in {source}")
    (out / "meta.json").write_text(json.dumps({"source": source, "classes": places.classes, "splits": splits,
                                               "native": native}))
    n, procs = sum(int(k.sum()) for k in places.kept.values()), pool_plan(len(layout), workers)[0]
    notice(f"decoded {n:,} images of {source} in {time.perf_counter() - t0:.1f} s "
           f"({procs} process{'es' if procs > 1 else ''}), cached in {out.parent}")


class Places:
    """Where each image of a layout (split, class, member) goes: its split and row (`slot`), whether it
    was decoded (`kept`, per split), and the members skipped as unreadable (`bad`)."""

    def __init__(self, layout: list[tuple[str, str, str]], skip_bad_images: bool, where: Callable[[str], str]):
        self.layout, self.skip_bad_images, self.where = layout, skip_bad_images, where
        self.classes = sorted({c for _, c, _ in layout})
        self.count: dict[str, int] = {}
        self.slot = []                                               # layout position -> (split, row)
        for split, _, _ in layout:
            self.slot.append((split, self.count.get(split, 0)))
            self.count[split] = self.count.get(split, 0) + 1
        self.kept = {s: np.zeros(n, dtype=bool) for s, n in self.count.items()}
        self.bad: list[str] = []

    def decoded(self, pos: int, got: np.ndarray | tuple | str) -> bool:
        """Whether the image at `pos` was decoded (`got` is not an error text); one that was not is an
        error, or with skip_bad_images is noted as skipped."""
        if not isinstance(got, str):
            return True
        if not self.skip_bad_images:
            raise PixformerError(f"cannot read image {self.where(self.layout[pos][2])} ({got}); pass "
                                 "--skip-bad-images to skip such files")
        self.bad.append(self.layout[pos][2])
        return False


def _decode_native(out: Path, places: Places, jobs: Iterable[tuple[int, bytes | str]], size, max_side, workers,
                   desc: str) -> dict[str, dict[str, np.ndarray]]:
    """Native images appended to each split's flat buffer in turn; {split: {"offsets", "shapes"}}."""
    index = {s: {"offsets": np.zeros(n, dtype=np.int64), "shapes": np.zeros((n, 3), dtype=np.int64)}
             for s, n in places.count.items()}
    writers: dict[str, FlatWriter] = {}
    try:
        with closing(decode_all(jobs, len(places.layout), size, max_side, workers, desc)) as results:
            for pos, arr in results:
                if places.decoded(pos, arr):
                    split, row = places.slot[pos]
                    if split not in writers:
                        writers[split] = FlatWriter(out / f"{split}.x.npy")
                    index[split]["offsets"][row] = writers[split].append(arr)
                    index[split]["shapes"][row] = arr.shape
                    places.kept[split][row] = True
    finally:
        for writer in writers.values():
            writer.close()
    return index


def _decode_equal(out: Path, places: Places, jobs: Iterable[tuple[int, bytes | str]], size, max_side, workers,
                  desc: str, source: str) -> None:
    """Images of one shape written into each split's (N, C, H, W) array by the workers that decode them;
    this process learns the shape (without `size`) by decoding the first image itself, and hears back
    only which images were written."""
    layout = places.layout
    jobs, shape, first = iter(jobs), None if size is None else (3, *size), None
    if shape is None:                        # the first image that decodes sets the shape of all
        for pos, src in jobs:
            try:
                shape = decode_image(src, None, max_side).shape
            except Exception as e:
                places.decoded(pos, failure(e))
                continue
            first = layout[pos][2]
            jobs = chain([(pos, src)], jobs)       # decoded again by a worker, which writes it
            break
    if shape is None:
        return
    files = {s: out / f"{s}.x.npy" for s in places.count}
    at = {}
    for s, file in files.items():
        array = new_array(file, (places.count[s], *shape))
        at[s] = array.offset
        del array                              # unmapped: the decoders write the file
    into = Rows(shape, {s: str(f) for s, f in files.items()}, at)
    placed = ((pos, src, *places.slot[pos]) for pos, src in jobs)
    with closing(decode_all(placed, len(layout), size, max_side, workers, desc, into)) as results:
        for pos, got in results:
            if not places.decoded(pos, got):
                continue
            if got != shape:
                raise PixformerError(different_sizes(source, shape[1:], first, got[1:], layout[pos][2]))
            split, row = places.slot[pos]
            places.kept[split][row] = True


def _write_index(out: Path, places: Places, index: dict[str, dict[str, np.ndarray]], native: bool) -> list[str]:
    """Each split's labels (and a native split's offsets and shapes) for the images kept; the files of a
    split with none removed. Returns the splits that kept images."""
    label = {c: i for i, c in enumerate(places.classes)}
    splits = [s for s in places.count if places.kept[s].any()]
    for split in places.count:
        rows = np.flatnonzero(places.kept[split])
        if split not in splits:
            (out / f"{split}.x.npy").unlink(missing_ok=True)
            continue
        labels = np.array([label[c] for s, c, _ in places.layout if s == split], dtype=np.int64)
        np.save(out / f"{split}.y.npy", labels[rows])
        if native:
            for name, values in index[split].items():
                np.save(out / f"{split}.{name}.npy", values[rows])
        elif len(rows) < places.count[split]:           # skipped images leave their rows unused
            np.save(out / f"{split}.rows.npy", rows.astype(np.int64))
    return splits


def map_splits(entry: Entry) -> dict[str, ImageSet | NativeSet]:
    """The splits of a decode cache entry, their images mapped (see the module doc)."""
    classes, out = entry.meta["classes"], {}
    for s in entry.meta["splits"]:
        labels = entry.tensor(f"{s}.y")
        if entry.meta["native"]:
            store = NativeStore(entry.tensor(f"{s}.x"), entry.arrays[f"{s}.offsets"], entry.arrays[f"{s}.shapes"])
            out[s] = NativeSet(store, labels, classes)
        else:
            rows = entry.arrays.get(f"{s}.rows")
            store = ImageStore(entry.tensor(f"{s}.x"), None if rows is None else torch.from_numpy(rows))
            out[s] = ImageSet(store, labels, classes)
    return out
