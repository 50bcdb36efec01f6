"""The decode cache (data/cache.py) and the stores over it (data/store.py): archives read in one pass,
ImageNet's nested class folders, entries checked and rebuilt, keyed by ctime, decoded in parallel
identically, mapped without copies, built by one process of many."""
import hashlib
import io
import multiprocessing as mp
import os
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixformer import PixformerError
from pixformer.data.cache import Progress, build_once
from pixformer.data.sources import load_source
from pixformer.data.splits import channel_stats, resolve_splits
from pixformer.data.store import ImageStore, NativeStore


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty decode cache for this test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("PIXFORMER_CACHE", str(folder))
    return folder


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_folder(root: Path, n: int, sizes=((8, 8),), fmt: str = "png", classes=("a", "b", "c"), seed=0) -> Path:
    """n images spread over class folders, sizes drawn from `sizes` (H, W)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:05d}.{fmt}")
    return root


def entry_of(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    return entry


# ---- archives in archive order ----------------------------------------------------------------------
def test_a_shuffled_archive_loads_in_linear_time_and_gives_the_sorted_twins_arrays(tmp_path, cache):
    rng = np.random.default_rng(0)
    members = [(f"set/{'ab'[i % 2]}/{i:04d}.png", png_bytes(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)))
               for i in range(1500)]
    shuffled = members[:]
    random.Random(0).shuffle(shuffled)
    seconds, loaded = {}, {}
    for name, order in (("sorted", sorted(members)), ("shuffled", shuffled)):
        path = tmp_path / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for member, data in order:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        t0 = time.perf_counter()
        loaded[name] = load_source(str(path), workers=1)["all"]
        seconds[name] = time.perf_counter() - t0
    assert seconds["shuffled"] <= 3 * seconds["sorted"] + 0.5, seconds
    a, b = loaded["sorted"], loaded["shuffled"]
    assert torch.equal(a.images[:], b.images[:]) and torch.equal(a.labels, b.labels) and len(a) == 1500
    first = np.array(Image.open(io.BytesIO(dict(members)["set/a/0000.png"]))).transpose(2, 0, 1)
    assert torch.equal(b.images[0], torch.from_numpy(first))          # sorted member order, whatever the archive's


# ---- ImageNet's layout ------------------------------------------------------------------------------
def test_the_class_is_the_first_folder_under_the_split_or_root_however_deep_the_image(tmp_path, cache):
    rng = np.random.default_rng(0)

    def put(root, rel):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(root / rel)
    split = tmp_path / "imagenet"
    for rel in ("train/cat/2019/a.png", "train/cat/b.png", "train/dog/2019/c.png", "train/dog/x/y/d.png",
                "val/cat/e.png", "val/dog/2020/f.png"):
        put(split, rel)
    found = load_source(str(split))
    assert sorted(found) == ["train", "val"] and found["train"].classes == ["cat", "dog"]
    assert found["train"].labels.tolist() == [0, 0, 1, 1] and found["val"].labels.tolist() == [0, 1]
    plain = tmp_path / "plain"
    for rel in ("top/cat/2019/a.png", "top/dog/2019/c.png", "top/dog/d.png"):    # one common top folder
        put(plain, rel)
    found = load_source(str(plain))
    assert found["all"].classes == ["cat", "dog"] and found["all"].labels.tolist() == [0, 1, 1]
    cifar100 = tmp_path / "cifar100"                                  # a plain tree with a class named train
    for rel in ("train/a.png", "car/b.png", "car/c.png"):
        put(cifar100, rel)
    found = load_source(str(cifar100))
    assert sorted(found) == ["all"] and found["all"].classes == ["car", "train"]
    put(split, "val/ILSVRC2012_val_00000001.png")                  # not sorted into a class folder
    with pytest.raises(PixformerError, match=r"1 image\(s\) in .* lie directly in a split folder, not in a class "
                                             r"folder \(e.g. val/ILSVRC2012_val_00000001.png\)"):
        load_source(str(split))


# ---- the cache entry: checked, rebuilt, keyed by ctime -----------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "overwritten", "manifest gone"])
def test_an_unreadable_cache_entry_is_decoded_again_saying_so_once(tmp_path, cache, capsys, damage):
    root = write_folder(tmp_path / "imgs", 12, sizes=((10, 12),))
    load_source(str(root))
    capsys.readouterr()
    entry = entry_of(cache)
    pixels = entry / "all.x.npy"
    if damage == "truncated":
        os.truncate(pixels, pixels.stat().st_size - 100)
    elif damage == "overwritten":
        with open(pixels, "r+b") as f:
            f.seek(pixels.stat().st_size // 2)
            f.write(b"\x00" * 64)
    else:
        (entry / "manifest.json").unlink()
    again = load_source(str(root))["all"]
    said = [line for line in capsys.readouterr().err.splitlines() if "is unreadable (" in line]
    assert len(said) == 1 and "building it again" in said[0], said
    want = np.array(Image.open(root / "a" / "00000.png")).transpose(2, 0, 1)
    assert torch.equal(again.images[0], torch.from_numpy(want))
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [entry.name]     # nothing left aside


def test_an_image_replaced_by_one_of_the_same_size_and_mtime_is_seen(tmp_path, cache):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    image = root / "a" / "x.bmp"                                       # BMP: the file size is the image size
    Image.fromarray(np.full((6, 6, 3), 10, np.uint8)).save(image)
    before = image.stat()
    assert (load_source(str(root))["all"].images[0] == 10).all()
    time.sleep(0.02)                                                   # past the kernel's timestamp granularity
    Image.fromarray(np.full((6, 6, 3), 200, np.uint8)).save(image)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))      # mtime set back; ctime cannot be
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert (load_source(str(root))["all"].images[0] == 200).all()


# ---- parallel decoding -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder, fixed size", "archive, fixed size", "archive, native",
                                  "folder, one own size, bad first"])
def test_parallel_decoding_is_byte_identical_to_one_worker(tmp_path, monkeypatch, kind):
    if kind.endswith("bad first"):           # the shape is learnt past a bad image; its row is left unused
        root = write_folder(tmp_path / "imgs", 160, sizes=((20, 14),), fmt="jpg")
        (root / "a" / "!bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")    # sorted first of all
        source, kwargs = str(root), dict(skip_bad_images=True)
    else:
        root = write_folder(tmp_path / "imgs", 160, sizes=((40, 30), (24, 36), (30, 30)), fmt="jpg")
        source, kwargs = str(root), dict(img_size=(16, 16))
    if kind.startswith("archive"):
        source = str(tmp_path / "imgs.tar")
        if kind.endswith("native"):
            kwargs = dict(native=True, max_side=20)
        with tarfile.open(source, "w") as tar:
            for p in random.Random(0).sample(sorted(root.rglob("*.jpg")), 160):   # not in sorted order
                tar.add(p, arcname=str(p.relative_to(tmp_path)))
    files = {}
    for workers in (1, 2):
        monkeypatch.setenv("PIXFORMER_CACHE", str(tmp_path / f"cache{workers}"))
        load_source(source, workers=workers, **kwargs)
        entry = entry_of(tmp_path / f"cache{workers}")
        files[workers] = {p.name: p.read_bytes() for p in entry.iterdir()}
    assert files[1] == files[2] and len([n for n in files[1] if n.endswith(".npy")]) >= 2
    if kind == "archive, fixed size":        # rows written out of order land where the folder's are
        monkeypatch.setenv("PIXFORMER_CACHE", str(tmp_path / "cache-folder"))
        load_source(str(root), workers=2, img_size=(16, 16))
        assert (entry_of(tmp_path / "cache-folder") / "all.x.npy").read_bytes() == files[2]["all.x.npy"]
    if kind.endswith("bad first"):
        assert np.load(io.BytesIO(files[2]["all.rows.npy"])).tolist() == list(range(1, 161))


@pytest.mark.parametrize("workers", [1, 2])
def test_an_image_of_another_size_is_named_with_the_first_whoever_decodes_it(tmp_path, cache, workers):
    root = write_folder(tmp_path / "imgs", 160, sizes=((12, 10),))
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "c" / "00150b.png")
    with pytest.raises(PixformerError, match=r"holds images of different sizes \(height x width: 12x10 a/00000\.png, 20x30 "
                                             r"c/00150b\.png\); pass --img-size N"):
        load_source(str(root), workers=workers)
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.iterdir() if p.name.endswith(".lock")]
    assert load_source(str(root), img_size=(8, 8), workers=workers)["all"].images.shape == (161, 3, 8, 8)


def test_a_decoding_worker_that_dies_fails_the_build_and_leaves_nothing(tmp_path, cache, monkeypatch):
    import pixformer.data.cache as cache_module
    root = write_folder(tmp_path / "imgs", 160, sizes=((12, 10),))
    parent, decode = os.getpid(), cache_module.decode_image

    def dies_on_one(src, size, max_side):        # forked workers inherit this
        if os.getpid() != parent and str(src).endswith("00100.png"):
            os._exit(1)
        return decode(src, size, max_side)
    monkeypatch.setattr(cache_module, "decode_image", dies_on_one)
    with pytest.raises(PixformerError, match="a decoding worker died while decoding"):
        load_source(str(root), workers=2)
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.iterdir() if p.name.endswith(".lock")]
    monkeypatch.setattr(cache_module, "decode_image", decode)
    members = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    want = np.array(Image.open(root / "b" / "00100.png")).transpose(2, 0, 1)
    found = load_source(str(root), workers=2)["all"]
    assert torch.equal(found.images[members.index("b/00100.png")], torch.from_numpy(want))


def test_rows_written_together_survive_short_writes(tmp_path, monkeypatch):
    from pixformer.data import cache as cache_module
    arrays = [np.full((3, 4, 5), i, np.uint8) for i in range(1, 6)]
    file = tmp_path / "rows.bin"
    file.write_bytes(bytes(10 + 5 * 60))
    calls = []

    def short(fd, buffers, at):              # the kernel may write less than asked: 25 bytes at a time
        calls.append(at)
        return os.pwrite(fd, bytes(b"".join(bytes(b) for b in buffers)[:25]), at)
    monkeypatch.setattr(os, "pwritev", short)
    fd = os.open(file, os.O_WRONLY)
    try:
        cache_module.write_rows(fd, arrays, 10)
    finally:
        os.close(fd)
    assert len(calls) == 12
    assert file.read_bytes() == bytes(10) + b"".join(a.tobytes() for a in arrays)


def test_shrunk_jpegs_are_drafted_to_the_size_asked(tmp_path, cache):
    root = tmp_path / "big"
    (root / "a").mkdir(parents=True)
    y, x = np.mgrid[0:192, 0:256]
    smooth = np.stack([x, y, x + y], -1).astype(np.float64)
    Image.fromarray((smooth * 255 / smooth.max()).astype(np.uint8)).save(root / "a" / "p.jpg", quality=95)
    fixed = load_source(str(root), img_size=(32, 32))["all"].images[0]
    native = load_source(str(root), native=True, max_side=64)["all"].images[0]
    assert fixed.shape == (3, 32, 32) and native.shape == (3, 48, 64)
    full = Image.open(root / "a" / "p.jpg").convert("RGB").resize((64, 48), Image.BICUBIC)
    assert (native.int() - torch.from_numpy(np.array(full).transpose(2, 0, 1)).int()).abs().float().mean() < 3


def test_workers_must_be_a_positive_count(tmp_path, cache):
    with pytest.raises(PixformerError, match="--workers must be a whole number >= 1"):
        load_source(str(write_folder(tmp_path / "imgs", 3)), workers=0)


def test_progress_says_plain_lines_when_not_on_a_terminal(capsys):
    p = Progress(4000, "decoding x", every=0.0)
    p.update(1000)
    p.close()
    err = capsys.readouterr().err
    assert "decoding x: 1,000/4,000 images (25 %)" in err and "\r" not in err


# ---- mapped stores ---------------------------------------------------------------------------------
def mapped_file(ptr: int) -> str | None:
    """The file mapped at address `ptr` in this process (from /proc/self/maps), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in span.split("-"))
        if lo <= ptr < hi:
            return rest[-1] if len(rest) == 5 else None
    return None


def test_a_mapped_split_subsets_and_batches_without_copying_the_set(tmp_path, cache):
    root = write_folder(tmp_path / "imgs", 300, sizes=((16, 16),))
    found = load_source(str(root))
    s = resolve_splits(found, 0.2, "imgs")
    train = s.train.images
    assert isinstance(train, ImageStore) and train.shape == (240, 3, 16, 16) and len(s.val) == 60
    assert mapped_file(train.base.data_ptr()).endswith("all.x.npy")      # the subset still maps the cache file
    assert train.base.data_ptr() == found["all"].images.base.data_ptr()
    assert train.owned_bytes == 240 * 8 and train.nbytes == 240 * 3 * 16 * 16
    idx = torch.tensor([5, 0, 239, 17])
    batch = train[idx]
    assert batch.untyped_storage().nbytes() == 4 * 3 * 16 * 16           # just the batch, copied
    whole = found["all"].images.materialize()
    assert whole.data_ptr() == train.base.data_ptr()                     # the whole set: the mapping, no copy
    assert torch.equal(batch, whole[train.index[idx]])
    assert torch.equal(train[3], whole[int(train.index[3])]) and mapped_file(train[3].data_ptr()) is not None
    assert torch.equal(train[10:14], train[torch.arange(10, 14)])
    twice = s.train.subset(torch.tensor([2, 1]))                         # indices compose
    assert torch.equal(twice.images[:], train[torch.tensor([2, 1])]) and twice.labels.tolist() == \
        s.train.labels[[2, 1]].tolist()
    for got, want in zip(channel_stats(train), channel_stats(train.materialize())):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want))
    batch.zero_()                                                        # writes never reach the cache file
    assert not (train[idx] == 0).all()


def test_a_native_split_is_a_lazy_sequence_of_mapped_views(tmp_path, cache):
    root = write_folder(tmp_path / "imgs", 30, sizes=((10, 14), (20, 8), (6, 6)))
    found = load_source(str(root), native=True, max_side=16)["all"]
    assert isinstance(found.images, NativeStore) and len(found.images) == 30 and found.in_chans == 3
    # sorted: a/ (10x14), b/ (20x8, shrunk to 16x6), c/ (6x6), ten each
    assert [tuple(found.images[i].shape) for i in (0, 10, 20)] == [(3, 10, 14), (3, 16, 6), (3, 6, 6)]
    assert mapped_file(found.images[10].data_ptr()).endswith("all.x.npy")
    sub = found.subset(torch.tensor([4, 10]))
    assert sub.images.owned_bytes == 16 and torch.equal(sub.images[1], found.images[10])
    assert sub.images[1].data_ptr() == found.images[10].data_ptr() and sub.labels.tolist() == [0, 1]
    listed = [im.clone() for im in found.images]
    mean, std = channel_stats(found.images)
    for got, want in zip((mean, std), channel_stats(listed, chunk=1)):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want))


def test_build_once_maps_what_one_build_wrote_and_leaves_nothing_of_a_failed_one(tmp_path, capsys):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "meta.json").write_text('{"n": 5}')
        return {"latents": np.arange(5, dtype=np.float32)}
    first = build_once(tmp_path / "entry", build)
    again = build_once(tmp_path / "entry", build)
    assert len(calls) == 1 and again.meta == {"n": 5} and isinstance(again.arrays["latents"], np.memmap)
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "entry").stat().st_mode & 0o777 == 0o777 & ~mask       # not tempfile's 0700: shareable
    t = again.tensor("latents")
    t += 1                                                               # copy-on-write: the file keeps 0..4
    assert first.arrays["latents"].tolist() == [0, 1, 2, 3, 4] == build_once(tmp_path / "entry", build).arrays[
        "latents"].tolist()

    def broken(tmp):
        (tmp / "half.npy").write_bytes(b"partial")
        raise PixformerError("cannot build")
    with pytest.raises(PixformerError, match="cannot build"):
        build_once(tmp_path / "other", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock", "other.lock"]


# ---- one process per machine builds ----------------------------------------------------------------
def _load_in_child(folder: str, cache: str, barrier, results) -> None:
    import contextlib
    os.environ["PIXFORMER_CACHE"] = cache
    out = io.StringIO()
    barrier.wait()
    with contextlib.redirect_stderr(out):
        found = load_source(folder, workers=1)["all"]
    digest = hashlib.sha1(found.images[:].numpy().tobytes() + found.labels.numpy().tobytes()).hexdigest()
    results.put((out.getvalue(), digest))


def test_two_processes_loading_one_folder_decode_it_once(tmp_path):
    root = write_folder(tmp_path / "imgs", 400, sizes=((24, 24),), fmt="jpg")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(root), str(tmp_path / "cache"), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    said = [out for out, _ in got]
    assert sum("decoded 400 images" in out for out in said) == 1, said
    assert got[0][1] == got[1][1]


def test_skipped_images_leave_no_row_behind(tmp_path, cache, capsys):
    root = write_folder(tmp_path / "imgs", 6, sizes=((5, 7),), classes=("a", "b"))
    (root / "a" / "00002b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")    # sorted between two good ones
    found = load_source(str(root), skip_bad_images=True)["all"]
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    want = [np.array(Image.open(p)).transpose(2, 0, 1) for p in sorted(root.rglob("*.png"))]
    assert len(found) == 6 and found.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(found.images[:], torch.from_numpy(np.stack(want)))


def test_a_cache_folder_that_cannot_be_written_still_serves_its_finished_entries(tmp_path, monkeypatch):
    build_once(tmp_path / "done", lambda tmp: {"a": np.arange(3)})
    real = os.open

    def refuse(file, *args, **kwargs):
        if str(file).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    assert build_once(tmp_path / "done", lambda tmp: pytest.fail("built again")).arrays["a"].tolist() == [0, 1, 2]
    with pytest.raises(PixformerError, match=r"cannot write a cache entry in .* \(Permission denied\): set "
                                             "PIXFORMER_CACHE to a writable folder"):
        build_once(tmp_path / "new", lambda tmp: {"a": np.arange(3)})


def test_a_store_indexes_like_the_tensor_it_stands_for():
    x = torch.randint(0, 256, (10, 3, 4, 5), dtype=torch.uint8)
    store = ImageStore(x).subset(torch.tensor([9, 2, 4, 4, 0]))
    want = x[[9, 2, 4, 4, 0]]
    assert store.shape == want.shape and len(store) == 5
    for key in (1, -1, torch.tensor(3), slice(1, 4), torch.tensor([0, 4]), [2, 2], torch.tensor([1, 0, 0, 1, 1]).bool(),
                (1, 0), (slice(0, 2), 2), (torch.tensor([3, 1]), slice(None), 0)):
        assert torch.equal(store[key], want[key]), key
    assert torch.equal(torch.stack(list(store)), want) and torch.equal(torch.as_tensor(np.asarray(store)), want)
    assert torch.equal(store.subset(torch.tensor([4, 0])).materialize(), want[[4, 0]])
