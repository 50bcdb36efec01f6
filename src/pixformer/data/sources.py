"""Data sources as uint8 images: small named sets read into memory, image folders decoded once and mapped.

Sources (`--data`): `digits` (scikit-learn's bundled 8x8 digits, offline), `cifar10`, `cifar100`
(official python-pickle release), `mnist`, `fashion-mnist` (idx files), or a path to an ImageFolder:
a directory of class folders, or a .tar / .tar.gz of one (optionally with train/, val/ and test/
split folders above the class folders, as ImageNet's train/ and val/; an image nested deeper belongs
to the class folder it lies under). A reader returns the splits it finds, by name: "train", "val",
"test", or "all" for a plain tree of class folders; `splits.resolve_splits` decides from these what a
run trains, validates and tests on. A Hugging Face dataset on disk (parquet files or a save_to_disk
folder) is read by data/hf.py. Named sets are tensors; an image folder's splits are stores over
its memory-mapped decode cache (data/store.py, data/cache.py), decoded in parallel, once per machine.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import stat
import struct
import tarfile
import tempfile
import unicodedata
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import PixformerError
from ..files import as_created
from .augment import resize
from .cache import build_once, decode_splits, map_splits, worker_count
from .native import check_native_size, shrunk
from .store import ImageSet, NativeSet, NativeStore, as_tensor

IMAGE_EXTS = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "validation": "val"}

CIFAR = {
    "cifar10": dict(archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names=b"label_names", labels=b"labels"),
    "cifar100": dict(archive="cifar-100-python.tar.gz", folder="cifar-100-python",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85",
                     train=["train"], test=["test"],
                     meta="meta", names=b"fine_label_names", labels=b"fine_labels"),
}
IDX = {
    "mnist": dict(url="https://ossci-datasets.s3.amazonaws.com/mnist/", files={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        classes=[str(i) for i in range(10)]),
    "fashion-mnist": dict(url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", files={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot"]),
}
NAMED_SOURCES = ["digits", *CIFAR, *IDX]


# ---- locations, download -------------------------------------------------------------------
def data_root(root: str | None = None) -> Path:
    return Path(root or os.environ.get("PIXFORMER_DATA") or Path.home() / ".cache" / "pixformer" / "data")


def cache_dir() -> Path:
    return Path(os.environ.get("PIXFORMER_CACHE") or Path.home() / ".cache" / "pixformer" / "decoded")


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch `url` to `dest` unless a file with the right checksum is there; verify; write atomically."""
    if dest.exists() and file_md5(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".part")
    try:
        print(f"downloading {url} -> {dest}")
        with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
        got = file_md5(Path(tmp))
        if got != md5:
            raise PixformerError(f"checksum mismatch for {url}: expected md5 {md5}, got {got}")
        os.replace(as_created(tmp), dest)
    except OSError as e:
        raise PixformerError(f"could not download {url} ({e}); place the file at {dest} by hand") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


# ---- readers -------------------------------------------------------------------------------
def load_digits_splits(test_fraction: float = 0.2) -> dict[str, ImageSet]:
    """scikit-learn's 1,797 8x8 digits (bundled, offline). It has no official test split: pixformer's
    is a fixed 20 % held out per class (seed 0), so every run and paper table uses the same one."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(len(idx) * test_fraction)]] = True
    full = ImageSet(images, labels, [str(i) for i in range(10)])
    return {"train": full.subset(~test), "test": full.subset(test)}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: numpy arrays, lists and dicts, nothing executable."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise PixformerError(f"{where} is not a readable CIFAR batch ({e})") from None


def load_cifar_splits(name: str, root: str | None, allow_download: bool = True) -> dict[str, ImageSet]:
    """CIFAR-10/100 from the official python release: an extracted folder or the .tar.gz archive,
    found at the given path or under the data root; downloaded (md5-checked) when absent."""
    spec = CIFAR[name]
    base = data_root(root)
    candidates = [base, base / spec["folder"], base / spec["archive"]]
    found = next((c for c in candidates if (c.is_dir() and (c / spec["meta"]).exists()) or
                  (c.is_file() and c.name.endswith((".tar.gz", ".tgz", ".tar")))), None)
    if found is None:
        if not allow_download:
            raise PixformerError(f"{name} not found under {base}: put {spec['archive']} or {spec['folder']}/ there")
        found = download(spec["url"], base / spec["archive"], spec["md5"])

    def read(member: str) -> bytes:
        if found.is_dir():
            p = found / member
            if not p.exists():
                raise PixformerError(f"{name}: missing file {p}")
            return p.read_bytes()
        with tarfile.open(found) as tar:
            try:
                return tar.extractfile(f"{spec['folder']}/{member}").read()
            except KeyError:
                raise PixformerError(f"{found} has no {spec['folder']}/{member}: not the official {name} archive") from None

    classes = [n.decode() for n in _unpickle(read(spec["meta"]), spec["meta"])[spec["names"]]]
    out = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for member in spec[split]:
            batch = _unpickle(read(member), member)
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[spec["labels"]], dtype=np.int64))
        out[split] = ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes)
    return out


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format), optionally gzipped, as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise PixformerError(f"{path} is a damaged gzip file ({e}): delete it, and it is downloaded again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise PixformerError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise PixformerError(f"{path} is truncated: its header is cut short")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PixformerError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def load_idx_splits(name: str, root: str | None, allow_download: bool = True) -> dict[str, ImageSet]:
    spec = IDX[name]
    base = data_root(root)
    folder = base if any((base / f).exists() or (base / f[:-3]).exists() for f in spec["files"]) else base / name
    paths = {}
    for fname, md5 in spec["files"].items():
        plain = folder / fname[:-3]
        if (folder / fname).exists() or plain.exists():
            paths[fname] = folder / fname if (folder / fname).exists() else plain
        elif allow_download:
            paths[fname] = download(spec["url"] + fname, folder / fname, md5)
        else:
            raise PixformerError(f"{name}: {fname} not found in {folder}")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
        y = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"])
        if len(x) != len(y):
            raise PixformerError(f"{name} {split}: {len(x)} images but {len(y)} labels")
        out[split] = ImageSet(torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)), spec["classes"])
    return out


# ---- image folders ---------------------------------------------------------------------------
CACHE_FORMAT = 3        # the decode cache's layout (1: one .npz read into memory; 2: mapped .npy entries;
                        # 3: class names Unicode NFC, 16-bit images scaled to 8 bits)


def scan_folder(path: Path) -> list[tuple[str, os.stat_result]]:
    """The image files under a directory (relative paths, sorted) with their stat."""
    found, root = [], str(path)
    for folder, _, names in os.walk(root, followlinks=True):
        rel = os.path.relpath(folder, root)                  # once a folder, not once an image
        prefix = "" if rel == "." else rel + os.sep
        for name in names:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTS:
                try:
                    st = os.stat(os.path.join(folder, name))
                except OSError:                              # a link to nothing: no image, as a folder is none
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((prefix + name, st))
    return sorted(found)


def source_fingerprint(path: Path, files: list[tuple[str, os.stat_result]] | None = None) -> str:
    """What the decode cache is keyed on, as a digest: a directory's every image file (path, size,
    modification time and change time), so adding, removing or replacing one image is seen; an
    archive's own size and times. The change time (ctime) is set by the kernel on every write and
    cannot be set back (as `touch -d` or os.utime can the modification time), so a file replaced by
    another of the same size with its old mtime restored is still seen."""
    h = hashlib.sha1()
    if path.is_dir():
        for rel, st in (scan_folder(path) if files is None else files):
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    else:
        st = path.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}".encode())
    return h.hexdigest()


def image_layout(members: list[str], source: Path) -> list[tuple[str, str, str]]:
    """(split, class, member) for each image member (sorted paths relative to the source) that lies in
    a class folder. The class is the first folder level under a split folder (train/, val/, test/),
    or under the root for a plain tree, however deep the image lies below it (as torchvision's
    ImageFolder: `cat/2019/a.png` is a cat), after stripping the folders every image lies in (a tree
    packed inside wrapping folders). A folder named like a split (train/, val/, test/) that holds its
    images directly, beside other class folders, is a class of a plain tree (CIFAR-100 has a class
    `train`), not a split. Class names
    are Unicode NFC: folders named alike but for their normalisation ("café" typed on Linux and copied
    from macOS, which writes NFD) are one class. Refused in one line: a member whose path leaves the
    source (absolute, or with a `..` part: an archive's), and images beside the split folders of a
    source that has them (they belong to no split)."""
    unsafe = next((m for m in members if m.startswith("/") or ".." in m.split("/")), None)
    if unsafe is not None:
        raise PixformerError(f"{source} holds the member {unsafe!r}, a path that leads out of it (absolute or "
                             "with '..'): refusing to read it")
    parts = [[p for p in m.split("/") if p not in ("", ".")] for m in members]
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1 \
            and parts[0][0].lower() not in SPLIT_NAMES:
        parts = [p[1:] for p in parts]
    entries, loose = [], []
    top = [m for m, p in zip(members, parts) if len(p) == 1]           # beside the class or split folders
    named = [p for p in parts if len(p) >= 2 and p[0].lower() in SPLIT_NAMES]
    plain = named and all(len(p) == 2 for p in named) and any(len(p) >= 2 and p[0].lower() not in SPLIT_NAMES
                                                                for p in parts)   # "train" is a class there
    for m, p in zip(members, parts):
        if len(p) >= 2 and p[0].lower() in SPLIT_NAMES and not plain:
            if len(p) == 2:
                loose.append(m)
            else:
                entries.append((SPLIT_NAMES[p[0].lower()], unicodedata.normalize("NFC", p[1]), m))
        elif len(p) >= 2:
            entries.append(("all", unicodedata.normalize("NFC", p[0]), m))
    if loose:
        raise PixformerError(f"{len(loose)} image(s) in {source} lie directly in a split folder, not in a class "
                             f"folder (e.g. {loose[0]}): put each in <split>/<class>/ (ImageNet's val images need "
                             "sorting into class folders by their ground-truth labels)")
    if not entries:
        raise PixformerError(f"{source} holds no images in class folders (expected {source}/<class>/<image>)")
    outside = [m for s, _, m in entries if s == "all"] + top
    if outside and any(s != "all" for s, _, _ in entries):
        raise PixformerError(f"{len(outside)} image(s) in {source} lie outside its split folders (e.g. {outside[0]}), "
                             "in no split: put every image in <split>/<class>/ (train/, val/, test/)")
    return entries


def check_classes(classes: list[str], min_classes: int, source) -> None:
    """A one-line error when a source has fewer than `min_classes` classes (a classifier needs 2)."""
    if len(classes) < min_classes:
        named = f" ({', '.join(classes[:3])})" if classes else ""
        raise PixformerError(f"{source} has {len(classes)} class{'es' if len(classes) != 1 else ''}{named}; a "
                             f"classifier needs at least {min_classes} to tell apart: put each class's images in a "
                             "folder of its own (<class>/<image>)")


def _tar_members(path: Path) -> dict[str, int]:
    """An archive's image members: name -> header offset (the last one of a repeated name)."""
    try:
        with tarfile.open(path) as tar:
            return {i.name: i.offset for i in tar if i.isfile() and Path(i.name).suffix.lower() in IMAGE_EXTS}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        why = str(e).strip()                     # tarfile's auto-detection lists each compression it tried:
        why = "not a tar archive, plain or gzip / bzip2 / xz compressed" if "\n" in why else why   # one line
        raise PixformerError(f"{path} is neither a directory nor a readable tar archive ({why})") from None


def _tar_jobs(path: Path, position: dict[int, int]):
    """(position, bytes) of the members at the header offsets in `position`, read in archive order
    in one pass: a gzip stream is never rewound, however the members are ordered in it."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                pos = position.get(info.offset)
                if pos is not None and info.isfile():
                    yield pos, tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise PixformerError(f"cannot read the archive {path} ({e})") from None


def load_image_folder(path: str | Path, img_size: tuple[int, int] | None, skip_bad_images: bool,
                      native: bool = False, max_side: int | None = None, workers: int | None = None,
                      min_classes: int = 0) -> dict[str, ImageSet | NativeSet]:
    """ImageFolder directory or archive -> splits ('train', 'val', 'test' as split folders exist, else
    'all'). Images of different sizes need `img_size` (they are resized to it), or `native`: each kept at
    its own size and aspect ratio (a NativeSet), scaled down to `max_side` pixels on its longer side if
    larger. Decoded once (by `workers` processes; None: every core) into a memory-mapped cache entry
    keyed by every source file (source_fingerprint) and the sizes asked for (data/cache.py). Fewer than
    `min_classes` class folders is refused before any image is decoded."""
    path = Path(path)
    if not path.exists():
        raise PixformerError(f"dataset path {path} does not exist")
    worker_count(workers)
    files = scan_folder(path) if path.is_dir() else None
    layout = image_layout([rel for rel, _ in files], path) if files is not None else None
    if layout is not None:                    # a directory: its classes known before any image is decoded
        check_classes(sorted({c for _, c, _ in layout}), min_classes, path)
    key = json.dumps([CACHE_FORMAT, str(path.resolve()), source_fingerprint(path, files),
                      None if img_size is None else list(img_size), skip_bad_images]
                     + ([native, max_side] if native else []))

    def build(tmp: Path) -> None:
        nonlocal layout
        if layout is None:                    # an archive: listed (one pass), then read in its own order
            members = _tar_members(path)
            layout = image_layout(sorted(members), path)
            check_classes(sorted({c for _, c, _ in layout}), min_classes, path)    # before decoding
            jobs = _tar_jobs(path, {members[m]: pos for pos, (_, _, m) in enumerate(layout)})
            where = lambda m: f"{path}:{m}"  # noqa: E731
        else:                                 # a directory: the workers read the files themselves
            root = str(path)
            jobs = ((pos, os.path.join(root, m)) for pos, (_, _, m) in enumerate(layout))
            where = lambda m: str(path / m)  # noqa: E731
        decode_splits(tmp, layout, jobs, size=img_size, max_side=max_side if native else None, native=native,
                      skip_bad_images=skip_bad_images, workers=workers, source=str(path), where=where)

    entry = build_once(cache_dir() / hashlib.sha1(key.encode()).hexdigest()[:20], build,
                       what=f"the decode cache of {path}")
    check_classes(entry.meta["classes"], min_classes, path)   # an archive decoded before (for a task needing none)
    return map_splits(entry)


def as_native(data: ImageSet, max_side: int | None) -> NativeSet:
    """Images of one size as a NativeSet (each scaled down to `max_side` on its longer side if larger)."""
    images = resize(data.images, shrunk(*data.images.shape[-2:], max_side))
    return NativeSet(NativeStore.of_tensor(as_tensor(images)), data.labels, data.classes)


def load_source(source: str, root: str | None = None, img_size: tuple[int, int] | None = None,
                skip_bad_images: bool = False, allow_download: bool = True, native: bool = False,
                max_side: int | None = None, workers: int | None = None, image_column: str | None = None,
                label_column: str | None = None, min_classes: int = 0) -> dict[str, ImageSet | NativeSet]:
    """Any data source -> its splits ('train' and 'test', or 'all' for a plain class-folder tree),
    images resized to `img_size` if given; with `native`, NativeSets of the images at their own sizes
    (scaled down to `max_side` on the longer side if larger). An image folder is decoded once by
    `workers` processes (None: every core; 1: in this process) and mapped (see load_image_folder); a
    Hugging Face dataset on disk (parquet, save_to_disk) is read where it lies and each image decoded
    when a batch reads it (data/hf.py; `image_column` / `label_column` name its columns). A source with
    fewer than `min_classes` classes is refused (check_classes), an image folder before it is decoded."""
    check_native_size(native, img_size)
    worker_count(workers)
    key = source.lower()
    if key == "digits":
        splits = load_digits_splits()
    elif key in CIFAR:
        splits = load_cifar_splits(key, root, allow_download)
    elif key in IDX:
        splits = load_idx_splits(key, root, allow_download)
    elif os.sep in source or Path(source).exists() or Path(source).suffix:
        from .hf import is_hf_dataset, load_hf
        if is_hf_dataset(source):     # never resized or copied whole: each image is decoded when read
            found = load_hf(source, img_size, native, max_side, image_column, label_column,
                            decode_threads=min(8, worker_count(workers)), skip_bad_images=skip_bad_images)
            check_classes(next(iter(found.values())).classes, min_classes, source)
            return found
        if native:                    # decoded at native size (below max_side) straight into NativeSets
            return load_image_folder(source, None, skip_bad_images, native=True, max_side=max_side, workers=workers,
                                     min_classes=min_classes)
        splits = load_image_folder(source, img_size, skip_bad_images, workers=workers, min_classes=min_classes)
    else:
        raise PixformerError(f"unknown data source {source!r}: use one of {NAMED_SOURCES}, a path to an "
                             "ImageFolder directory or .tar/.tar.gz archive, or a Hugging Face dataset on disk "
                             "(parquet files, a save_to_disk folder)")
    if img_size is not None:
        splits = {s: ImageSet(resize(v.images, img_size), v.labels, v.classes) for s, v in splits.items()}
    if native:
        splits = {s: as_native(v, max_side) for s, v in splits.items()}
    return splits
