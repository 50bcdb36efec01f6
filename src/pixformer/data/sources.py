"""Data sources, read into uint8 tensors in memory and decoded once.

Sources (`--data`): `digits` (scikit-learn's bundled 8x8 digits, offline), `cifar10`, `cifar100`
(official python-pickle release), `mnist`, `fashion-mnist` (idx files), or a path to an ImageFolder:
a directory of class folders, or a .tar / .tar.gz of one (optionally with train/, val/ and test/
split folders above the class folders). A reader returns the splits it finds, by name: "train",
"val", "test", or "all" for a plain tree of class folders; `splits.resolve_splits` decides from
these what a run trains, validates and tests on.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PixformerError
from .native import NativeSet, shrunk

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
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


@dataclass
class ImageSet:
    """A split in memory: uint8 images (N, C, H, W), int64 labels (N,), class names."""
    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Tensor) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], self.classes)


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
        os.replace(tmp, dest)
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
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise PixformerError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
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


def _folder_images(path: Path) -> list[str]:
    """The image files under a directory, relative to it, sorted."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def source_fingerprint(path: Path) -> list:
    """What the decode cache is keyed on: a directory's every image file (path, size, modification
    time), so adding, removing or replacing one image is seen; an archive's own size and time."""
    if path.is_dir():
        return [[m, (st := (path / m).stat()).st_size, st.st_mtime_ns] for m in _folder_images(path)]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _list_image_folder(path: Path) -> tuple[list[tuple[str, str, str]], callable]:
    """Entries (split, class, member) of a directory or tar archive, and a function reading a member."""
    if path.is_dir():
        members = _folder_images(path)
        reader = lambda m: (path / m).read_bytes()  # noqa: E731
    else:
        try:
            tar = tarfile.open(path)
        except (tarfile.TarError, OSError) as e:
            raise PixformerError(f"{path} is neither a directory nor a readable tar archive ({e})") from None
        infos = {i.name: i for i in tar.getmembers() if i.isfile() and Path(i.name).suffix.lower() in IMAGE_EXTS}
        members = sorted(infos)
        reader = lambda m: tar.extractfile(infos[m]).read()  # noqa: E731
    parts = [Path(m).parts for m in members]
    # strip a single common top folder that is neither a split nor a class folder with images in it
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1 \
            and parts[0][0].lower() not in SPLIT_NAMES:
        parts = [p[1:] for p in parts]
    entries = []
    for m, p in zip(members, parts):
        if len(p) >= 3 and p[0].lower() in SPLIT_NAMES:
            entries.append((SPLIT_NAMES[p[0].lower()], p[-2], m))
        elif len(p) >= 2:
            entries.append(("all", p[-2], m))
    if not entries:
        raise PixformerError(f"{path} holds no images in class folders (expected {path}/<class>/<image>)")
    return entries, reader


def load_image_folder(path: str | Path, img_size: tuple[int, int] | None, skip_bad_images: bool,
                      native: bool = False, max_side: int | None = None) -> dict[str, ImageSet | NativeSet]:
    """ImageFolder directory or archive -> splits ('train', 'val', 'test' as split folders exist, else
    'all'). Images of different sizes need `img_size` (they are resized to it), or `native`: each kept at
    its own size and aspect ratio (a NativeSet), scaled down to `max_side` pixels on its longer side if
    larger. Decoded once into a uint8 cache file keyed by every source file (source_fingerprint) and
    the sizes asked for."""
    from PIL import Image
    path = Path(path)
    if not path.exists():
        raise PixformerError(f"dataset path {path} does not exist")
    key = json.dumps([str(path.resolve()), source_fingerprint(path), img_size, skip_bad_images]
                     + ([native, max_side] if native else []))
    cached = cache_dir() / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".npz")
    if cached.exists():
        z = np.load(cached, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        if native:
            return {s: _native_from_flat(z[f"{s}_x"], z[f"{s}_shapes"], z[f"{s}_y"], meta["classes"]) for s in meta["splits"]}
        return {s: ImageSet(torch.from_numpy(z[f"{s}_x"]), torch.from_numpy(z[f"{s}_y"]), meta["classes"])
                for s in meta["splits"]}

    entries, reader = _list_image_folder(path)
    classes = sorted({c for _, c, _ in entries})
    target, first = img_size, None
    xs: dict[str, list] = {}
    ys: dict[str, list] = {}
    bad: list[str] = []
    from tqdm import tqdm
    for split, cls, member in tqdm(entries, desc=f"decoding {path.name}", unit="img", leave=False,
                                   disable=len(entries) < 2000 or not sys.stderr.isatty()):
        try:
            with Image.open(io.BytesIO(reader(member))) as im:
                if native and max_side:
                    im.draft("RGB", (max_side, max_side))   # JPEG: decode at a reduced scale when it can
                im = im.convert("RGB")
                if native:
                    h, w = shrunk(im.height, im.width, max_side)
                    im = im if (h, w) == (im.height, im.width) else im.resize((w, h), Image.BICUBIC)
                elif img_size is None and first is None:
                    first = (im.height, im.width, member)
                if not native and img_size is None and (im.height, im.width) != first[:2]:
                    raise PixformerError(
                        f"{path} holds images of different sizes ({first[0]}x{first[1]} {first[2]}, "
                        f"{im.height}x{im.width} {member}); pass --img-size N to resize them all to NxN, or "
                        "--max-side S / --max-tokens N to train at native resolution")
                if target is not None and (im.height, im.width) != tuple(target):
                    im = im.resize((target[1], target[0]), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except PixformerError:
            raise
        except Exception as e:  # PIL raises many types for corrupt files
            if not skip_bad_images:
                raise PixformerError(f"cannot read image {path / member if path.is_dir() else f'{path}:{member}'} "
                                     f"({type(e).__name__}: {e}); pass --skip-bad-images to skip such files") from None
            bad.append(member)
            continue
        xs.setdefault(split, []).append(arr)
        ys.setdefault(split, []).append(classes.index(cls))
    if bad:
        print(f"skipped {len(bad)} unreadable image(s) in {path}, e.g. {bad[0]}")
    if not xs:
        raise PixformerError(f"no readable images in {path}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".npz")
    if native:   # one flat array of pixels and each image's shape
        arrays = {**{f"{s}_x": np.concatenate([a.ravel() for a in xs[s]]) for s in xs},
                  **{f"{s}_shapes": np.array([a.shape for a in xs[s]], dtype=np.int64) for s in xs}}
    else:
        arrays = {f"{s}_x": np.stack(xs[s]) for s in xs}
    with os.fdopen(fd, "wb") as f:
        np.savez(f, meta=json.dumps({"classes": classes, "splits": list(xs)}), **arrays,
                 **{f"{s}_y": np.array(ys[s], dtype=np.int64) for s in xs})
    os.replace(tmp, cached)
    if native:
        return {s: _native_from_flat(arrays[f"{s}_x"], arrays[f"{s}_shapes"], np.array(ys[s]), classes) for s in xs}
    return {s: ImageSet(torch.from_numpy(arrays[f"{s}_x"]), torch.tensor(ys[s], dtype=torch.int64), classes) for s in xs}


def _native_from_flat(flat: np.ndarray, shapes: np.ndarray, labels: np.ndarray, classes: list[str]) -> NativeSet:
    """A NativeSet from its cached form: all pixels in one flat array and each image's (C, H, W)."""
    data = torch.from_numpy(np.ascontiguousarray(flat))
    ends = np.cumsum([int(np.prod(s)) for s in shapes])
    images = [data[e - int(np.prod(s)): e].view(*(int(v) for v in s)) for s, e in zip(shapes, ends)]
    return NativeSet(images, torch.from_numpy(labels.astype(np.int64)), classes)


def as_native(data: ImageSet, max_side: int | None) -> NativeSet:
    """Images of one size as a NativeSet (each scaled down to `max_side` on its longer side if larger)."""
    images = resize(data.images, shrunk(*data.images.shape[-2:], max_side))
    return NativeSet(list(images), data.labels, data.classes)


def load_source(source: str, root: str | None = None, img_size: tuple[int, int] | None = None,
                skip_bad_images: bool = False, allow_download: bool = True, native: bool = False,
                max_side: int | None = None) -> dict[str, ImageSet | NativeSet]:
    """Any data source -> its splits ('train' and 'test', or 'all' for a plain class-folder tree),
    images resized to `img_size` if given; with `native`, NativeSets of the images at their own sizes
    (scaled down to `max_side` on the longer side if larger)."""
    if native and img_size is not None:
        raise PixformerError("native resolution (--max-side / --max-tokens) keeps each image's size: drop --img-size")
    key = source.lower()
    if key == "digits":
        splits = load_digits_splits()
    elif key in CIFAR:
        splits = load_cifar_splits(key, root, allow_download)
    elif key in IDX:
        splits = load_idx_splits(key, root, allow_download)
    elif os.sep in source or Path(source).exists() or Path(source).suffix:
        from .hf import is_hf_dataset, load_hf
        if is_hf_dataset(source):     # Hugging Face parquet / save_to_disk: streamed, decoded per batch
            return load_hf(source, img_size, native=native, max_side=max_side, skip_bad_images=skip_bad_images)
        if native:                    # decoded at native size (below max_side) straight into NativeSets
            return load_image_folder(source, None, skip_bad_images, native=True, max_side=max_side)
        splits = load_image_folder(source, img_size, skip_bad_images)
    else:
        raise PixformerError(f"unknown data source {source!r}: use one of {NAMED_SOURCES} or a path to an "
                             "ImageFolder directory or .tar/.tar.gz archive")
    if img_size is not None:
        splits = {s: ImageSet(resize(v.images, img_size), v.labels, v.classes) for s, v in splits.items()}
    if native:
        splits = {s: as_native(v, max_side) for s, v in splits.items()}
    return splits


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, *size), antialiased bilinear; a no-op at the same size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = [F.interpolate(chunk.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
           for chunk in images.split(4096)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)
