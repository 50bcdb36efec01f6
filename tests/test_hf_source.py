"""The Hugging Face source: parquet files and save_to_disk folders, decoded on the fly (data/hf.py)."""
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from pixformer import PixformerError  # noqa: E402
from pixformer.data import hf  # noqa: E402
from pixformer.data.hf import HFImages, load_hf, split_of  # noqa: E402
from pixformer.data.store import ImageSet, NativeSet  # noqa: E402
from pixformer.data.native import shrunk  # noqa: E402

CLASSES = ["cat", "dog", "ship"]


def encoded(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, fmt)
    return b.getvalue()


def pictures(n: int, size=(10, 12), seed=0, gray=False) -> list[bytes]:
    """n PNG images of random noise (incompressible), h x w = size (a list of sizes: one each)."""
    rng = np.random.default_rng(seed)
    sizes = size if isinstance(size, list) else [size] * n
    return [encoded(rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def hf_dataset(images: list[bytes], labels: list[int], classes=CLASSES):
    """A `datasets.Dataset` with an Image column and a ClassLabel (or, classes=None, plain int) label."""
    label = datasets.ClassLabel(names=list(classes)) if classes else datasets.Value("int64")
    d = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": labels})
    return d.cast_column("image", datasets.Image()).cast_column("label", label)


def by_hand(data: bytes, size=None, mode="RGB") -> torch.Tensor:
    """What the ImageFolder reader makes of one image: convert, then bicubic resize to `size`."""
    im = Image.open(io.BytesIO(data)).convert(mode)
    if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BICUBIC)
    a = np.asarray(im)
    return torch.from_numpy((a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy())


def labels_of(n, k=3):
    return [i % k for i in range(n)]


# ---- layouts ------------------------------------------------------------------------------------
def test_parquet_file_with_class_names_and_a_batch_equal_to_pil(tmp_path):
    imgs = pictures(20)
    hf_dataset(imgs, labels_of(20)).to_parquet(str(tmp_path / "d.parquet"))
    found = load_hf(tmp_path / "d.parquet", img_size=(8, 8))
    assert list(found) == ["train"]
    s = found["train"]
    assert isinstance(s, ImageSet) and isinstance(s.images, HFImages) and s.images.decodes_on_the_fly
    assert s.classes == CLASSES and s.labels.tolist() == labels_of(20)
    assert s.images.shape == (20, 3, 8, 8) and len(s) == 20
    idx = torch.tensor([7, 0, 19, 3])
    batch = s.images[idx]
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 8, 8)
    assert torch.equal(batch, torch.stack([by_hand(imgs[i], (8, 8)) for i in idx.tolist()]))
    assert torch.equal(s.images[5], by_hand(imgs[5], (8, 8)))           # one image, and slices
    assert torch.equal(s.images[2:4], torch.stack([by_hand(imgs[i], (8, 8)) for i in (2, 3)]))
    # without img_size, images of one size are kept as they are
    same = load_hf(tmp_path / "d.parquet")["train"].images
    assert same.shape == (20, 3, 10, 12) and torch.equal(same[[1]][0], by_hand(imgs[1]))


def test_batch_equals_the_image_folder_reader(tmp_path):
    from pixformer.data.sources import load_image_folder
    imgs, labels = pictures(9, size=(13, 11), seed=3), labels_of(9)
    for i, (b, y) in enumerate(zip(imgs, labels)):
        (tmp_path / "tree" / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / CLASSES[y] / f"{i:03d}.png").write_bytes(b)
    folder = load_image_folder(tmp_path / "tree", (8, 8), False)["all"]
    order = sorted(range(9), key=lambda i: (CLASSES[labels[i]], i))       # the folder reader's order
    hf_dataset(imgs, labels).to_parquet(str(tmp_path / "d.parquet"))
    s = load_hf(tmp_path / "d.parquet", img_size=(8, 8))["train"]
    assert torch.equal(s.images[torch.tensor(order)], folder.images.materialize())
    assert s.labels[order].tolist() == folder.labels.tolist()


def test_folder_of_split_files_with_plain_int_labels(tmp_path):
    data = tmp_path / "set" / "data"
    data.mkdir(parents=True)
    parts = {"train-00000-of-00002": (pictures(6, seed=1), [0, 1, 2, 3, 0, 1]),
             "train-00001-of-00002": (pictures(5, seed=2), [4, 4, 0, 1, 2]),
             "validation-00000-of-00001": (pictures(3, seed=3), [0, 1, 2]),
             "test-00000-of-00001": (pictures(4, seed=4), [3, 2, 1, 0])}
    for name, (imgs, labels) in parts.items():
        hf_dataset(imgs, labels, classes=None).to_parquet(str(data / f"{name}.parquet"))
    found = load_hf(tmp_path / "set", img_size=(6, 6))
    assert sorted(found) == ["test", "train", "val"]
    assert (len(found["train"]), len(found["val"]), len(found["test"])) == (11, 3, 4)
    assert found["train"].classes == ["0", "1", "2", "3", "4"] == found["test"].classes
    assert found["train"].labels.tolist() == [0, 1, 2, 3, 0, 1, 4, 4, 0, 1, 2]
    second = parts["train-00001-of-00002"][0]
    assert torch.equal(found["train"].images[torch.tensor([7, 10])], torch.stack([by_hand(second[i], (6, 6)) for i in (1, 4)]))
    assert torch.equal(found["test"].images[torch.tensor([2])][0], by_hand(parts["test-00000-of-00001"][0][2], (6, 6)))


@pytest.mark.parametrize("path,split", [
    ("train.parquet", "train"), ("data/train-00000-of-00001.parquet", "train"),
    ("data/validation-00000-of-00003.parquet", "val"), ("valid.parquet", "val"), ("dev-0.parquet", "val"),
    ("default/test/0000.parquet", "test"), ("data/testing-2.parquet", "test"), ("latest/part-0.parquet", None),
    ("my_train_set.parquet", "train"), ("trains.parquet", None), ("images.parquet", None)])
def test_split_names_follow_datasets(path, split):
    from pathlib import Path
    assert split_of(Path(path)) == split


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    imgs = pictures(12, seed=5)
    d = hf_dataset(imgs, labels_of(12))
    d.save_to_disk(str(tmp_path / "one"))
    one = load_hf(tmp_path / "one", img_size=(8, 8))
    assert list(one) == ["train"] and one["train"].classes == CLASSES
    assert torch.equal(one["train"].images[torch.tensor([11, 4])], torch.stack([by_hand(imgs[i], (8, 8)) for i in (11, 4)]))
    dd = datasets.DatasetDict({"train": d.select(range(8)), "validation": d.select(range(8, 10)),
                               "test": d.select(range(10, 12))})
    dd.save_to_disk(str(tmp_path / "dict"))
    found = load_hf(tmp_path / "dict")
    assert sorted(found) == ["test", "train", "val"]
    assert (len(found["train"]), len(found["val"]), len(found["test"])) == (8, 2, 2)
    assert found["val"].labels.tolist() == labels_of(12)[8:10]
    assert torch.equal(found["test"].images[torch.tensor([1])][0], by_hand(imgs[11]))


def test_native_resolution_keeps_each_size(tmp_path):
    sizes = [(10, 30), (24, 8), (7, 7), (40, 20), (12, 12)]
    imgs = pictures(5, size=sizes, seed=6)
    hf_dataset(imgs, labels_of(5)).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(PixformerError, match=r"different sizes \(height x width: 10x30 .*row 0, 24x8 .*row 1\); pass --img-size"):
        load_hf(tmp_path / "d")
    s = load_hf(tmp_path / "d", native=True, max_side=16)["train"]
    assert isinstance(s, NativeSet) and s.in_chans == 3
    for i, (h, w) in enumerate(sizes):
        assert torch.equal(s.images[i], by_hand(imgs[i], shrunk(h, w, 16)))
    sub = s.subset(torch.tensor([3, 1]))
    assert isinstance(sub, NativeSet) and sub.labels.tolist() == [0, 1]
    assert [tuple(im.shape) for im in sub.images] == [(3, 16, 8), (3, 16, 5)]
    assert [tuple(im.shape) for im in s.images[torch.tensor([2, 4])]] == [(3, 7, 7), (3, 12, 12)]


def test_grayscale_images_give_one_channel(tmp_path):
    imgs = pictures(6, seed=7, gray=True)
    hf_dataset(imgs, labels_of(6)).to_parquet(str(tmp_path / "g.parquet"))
    s = load_hf(tmp_path / "g.parquet", img_size=(5, 5))["train"]
    assert s.images.shape == (6, 1, 5, 5)
    assert torch.equal(s.images[torch.tensor([3])][0], by_hand(imgs[3], (5, 5), "L"))


def test_jpeg_is_drafted_when_shrinking(tmp_path):
    rng = np.random.default_rng(8)
    imgs = [encoded(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG") for _ in range(3)]
    hf_dataset(imgs, labels_of(3)).to_parquet(str(tmp_path / "j.parquet"))
    s = load_hf(tmp_path / "j.parquet", img_size=(16, 16))["train"]
    im = Image.open(io.BytesIO(imgs[1]))
    im.draft("RGB", (16, 16))                       # libjpeg decodes at 1/4 scale, then bicubic to 16x16
    want = np.asarray(im.convert("RGB").resize((16, 16), Image.BICUBIC)).transpose(2, 0, 1)
    assert im.size == (16, 16) and torch.equal(s.images[1], torch.from_numpy(want.copy()))


# ---- streaming: nothing read or decoded whole -----------------------------------------------------
def test_parquet_is_read_by_row_group(tmp_path, monkeypatch):
    imgs = pictures(100, size=(8, 8), seed=9)
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in imgs],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels_of(100), pa.int64())})
    pq.write_table(table, tmp_path / "rg.parquet", row_group_size=10)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, *a, **k: reads.append(i) or real(self, i, *a, **k))
    monkeypatch.setattr(hf, "PROBE_HEADERS", 10)          # the probe: one row group's headers
    s = load_hf(tmp_path / "rg.parquet", row_group_cache_mb=0)["train"]
    assert len(reads) == 1 and s.images.shape == (100, 3, 8, 8) and s.labels.tolist() == labels_of(100)
    rows = s.images.decoder.rows
    rows.cache.clear()
    reads.clear()
    batch = s.images[torch.tensor([55, 0, 5, 59])]
    assert sorted(reads) == [0, 5]                        # the two row groups holding the rows, once each
    assert torch.equal(batch, torch.stack([by_hand(imgs[i]) for i in (55, 0, 5, 59)]))
    assert len(rows.cache) == 1                           # a cache of 0 MB keeps only the group read last
    reads.clear()
    s.images[torch.tensor([56, 57])]                      # ... which a batch in it then reads from memory
    assert reads == []
    # a stats sample of parquet rows is drawn by whole row groups
    sample = s.images.sample_indices(limit=25, seed=1)
    assert len(sample) == 25 and len(np.unique(rows.group_of(sample.numpy()))) == 3
    assert torch.equal(sample, s.images.sample_indices(limit=25, seed=1))


def test_arrow_is_memory_mapped_not_read(tmp_path):
    imgs = pictures(400, size=(32, 32), seed=10)
    hf_dataset(imgs, labels_of(400)).save_to_disk(str(tmp_path / "big"))
    size = sum(f.stat().st_size for f in (tmp_path / "big").glob("*.arrow"))
    before = pa.total_allocated_bytes()
    s = load_hf(tmp_path / "big", img_size=(8, 8))["train"]
    s.images[torch.arange(0, 400, 25)]
    assert size > 1_000_000 and pa.total_allocated_bytes() - before < size / 10


def test_subsets_compose_and_decode_nothing(tmp_path, monkeypatch):
    imgs = pictures(30, seed=11)
    hf_dataset(imgs, labels_of(30)).to_parquet(str(tmp_path / "d.parquet"))
    s = load_hf(tmp_path / "d.parquet")["train"]
    decoded = []
    real = hf.Decoder.decode
    monkeypatch.setattr(hf.Decoder, "decode", lambda self, item, row: decoded.append(row) or real(self, item, row))
    sub = s.subset(torch.arange(10, 30)).subset(torch.tensor([5, 0, 19]))
    mask = s.subset(torch.arange(30) % 2 == 1)
    assert decoded == [] and isinstance(sub, ImageSet) and len(mask) == 15
    assert sub.labels.tolist() == [labels_of(30)[i] for i in (15, 10, 29)]
    assert torch.equal(sub.images[torch.tensor([2, 0])], torch.stack([by_hand(imgs[i]) for i in (29, 15)]))
    assert sorted(decoded) == [15, 29]
    assert torch.equal(mask.images[-1], by_hand(imgs[29]))
    sample = s.images.sample_indices(limit=10)
    assert len(sample) == 10 and sample.unique().numel() == 10 and int(sample.max()) < 30
    assert len(s.images.sample_indices()) == 30                 # a small split: every image
    assert torch.equal(sub.images.materialize(), torch.stack([by_hand(imgs[i]) for i in (15, 10, 29)]))


def test_threads_decode_a_batch_alike_and_concurrently(tmp_path):
    imgs = pictures(64, size=(20, 20), seed=12)
    hf_dataset(imgs, labels_of(64)).to_parquet(str(tmp_path / "d.parquet"))
    one = load_hf(tmp_path / "d.parquet", img_size=(9, 9), decode_threads=1)["train"].images
    many = load_hf(tmp_path / "d.parquet", img_size=(9, 9), decode_threads=4)["train"].images
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    want = one[idx]
    assert torch.equal(many[idx], want)
    results, errors = {}, []

    def worker(k):
        try:
            results[k] = many[idx[k * 8:(k + 1) * 8]]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and torch.equal(torch.cat([results[k] for k in range(8)]), want)


# ---- bad input: one line each, naming the file ---------------------------------------------------
def write_table(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


def image_struct(imgs):
    return pa.array([{"bytes": b, "path": None} for b in imgs], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def bad_no_image(tmp_path):
    return write_table(tmp_path / "x.parquet", {"pixels": pa.array(pictures(3)), "label": [0, 1, 2]}), {}


def bad_no_label(tmp_path):
    return write_table(tmp_path / "x.parquet", {"image": image_struct(pictures(3)), "target": [0, 1, 2]}), {}


def bad_string_labels(tmp_path):
    return write_table(tmp_path / "x.parquet", {"image": image_struct(pictures(3)), "label": ["a", "b", "c"]}), {}


def bad_float_labels(tmp_path):
    return write_table(tmp_path / "x.parquet", {"image": image_struct(pictures(3)), "label": [0.0, 1.0, 2.5]}), {}


def bad_negative_label(tmp_path):
    return write_table(tmp_path / "x.parquet", {"image": image_struct(pictures(3)), "label": [0, -1, 2]}), {}


def bad_corrupt_image(tmp_path):
    imgs = pictures(4)
    imgs[2] = b"not an image at all"
    hf_dataset(imgs, labels_of(4)).to_parquet(str(tmp_path / "x.parquet"))
    return tmp_path / "x.parquet", {}


def bad_truncated_image(tmp_path):
    imgs = pictures(4, size=(40, 40))
    imgs[1] = imgs[1][: len(imgs[1]) // 2]
    hf_dataset(imgs, labels_of(4)).save_to_disk(str(tmp_path / "x"))
    return tmp_path / "x", {}


def bad_missing_split(tmp_path):
    d = hf_dataset(pictures(4), labels_of(4))
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "x"))
    import shutil
    shutil.rmtree(tmp_path / "x" / "test")
    return tmp_path / "x", {}


def bad_named_column(tmp_path):
    hf_dataset(pictures(3), labels_of(3)).to_parquet(str(tmp_path / "x.parquet"))
    return tmp_path / "x.parquet", {"label_column": "fine_label"}


def bad_array_images(tmp_path):
    return write_table(tmp_path / "x.parquet", {"image": pa.array([[1, 2], [3, 4]]), "label": [0, 1]}), {}


def bad_different_sizes(tmp_path):
    hf_dataset(pictures(3, size=[(8, 8), (8, 8), (9, 8)]), labels_of(3)).to_parquet(str(tmp_path / "x.parquet"))
    return tmp_path / "x.parquet", {}


@pytest.mark.parametrize("make,match", [
    (bad_no_image, r"x.parquet has no image column .*columns \['pixels', 'label'\]\): name it with --image-column "
                   r"\(image_column= in Python\)"),
    (bad_no_label, r"x.parquet has no label column .*: name it with --label-column \(label_column= in Python\)"),
    (bad_string_labels, r"x.parquet: label column 'label' holds string, not integers or a ClassLabel"),
    (bad_float_labels, r"x.parquet: label column 'label' holds double, not integers"),
    (bad_negative_label, r"x.parquet row 1: label -1 is not one of the 3 classes 0..2"),
    (bad_corrupt_image, r"cannot decode the image at .*x.parquet row 2 \(UnidentifiedImageError"),
    (bad_truncated_image, r"cannot decode the image at .*data-00000-of-00001.arrow row 1 \("),
    (bad_missing_split, r"dataset_dict.json lists a split in .*test, which holds no saved dataset"),
    (bad_named_column, r"x.parquet has no column 'fine_label' \(label_column\)"),
    (bad_array_images, r"x.parquet: image column 'image' holds list<.*int64>, not encoded images"),
    (bad_different_sizes, r"x.parquet holds images of different sizes \(height x width: 8x8 .*row 0, 9x8 .*row 2\); pass --img-size N"),
])
def test_bad_input_is_one_line(tmp_path, make, match):
    path, kwargs = make(tmp_path)
    with pytest.raises(PixformerError, match=match) as e:
        load_hf(path, **kwargs)
    assert "\n" not in str(e.value)


def test_a_bad_image_past_the_probe_is_named_when_read(tmp_path, monkeypatch):
    imgs = pictures(30, size=(6, 6))
    imgs[25] = b"\x89PNG broken"
    hf_dataset(imgs, labels_of(30)).to_parquet(str(tmp_path / "late.parquet"))
    monkeypatch.setattr(hf, "PROBE_HEADERS", 10)
    s = load_hf(tmp_path / "late.parquet", img_size=(4, 4), decode_threads=2)["train"]
    s.images[torch.arange(20)]
    with pytest.raises(PixformerError, match=r"cannot decode the image at .*late.parquet row 25 "):
        s.images[torch.arange(20, 30)]


def test_not_a_dataset_and_skip_bad_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixformerError, match="holds no parquet files and no save_to_disk dataset"):
        load_hf(tmp_path / "empty")
    hf_dataset(pictures(3), labels_of(3)).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(PixformerError, match="decoded on the fly.*drop --skip-bad-images"):
        load_hf(tmp_path / "d.parquet", skip_bad_images=True)
    with pytest.raises(PixformerError, match="drop --img-size"):
        load_hf(tmp_path / "d.parquet", img_size=(8, 8), native=True, max_side=8)


# ---- through load_source and train -----------------------------------------------------------------
def test_load_source_sends_hf_layouts_here(tmp_path):
    from pixformer.data.sources import load_source
    d = hf_dataset(pictures(6), labels_of(6))
    d.to_parquet(str(tmp_path / "f.parquet"))
    d.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    d.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    for p in ("f.parquet", "saved", "pq"):
        found = load_source(str(tmp_path / p), img_size=(8, 8))
        assert isinstance(found["train"].images, HFImages) and found["train"].images.shape == (6, 3, 8, 8)
    native = load_source(str(tmp_path / "saved"), native=True, max_side=4)["train"]
    assert isinstance(native, NativeSet) and tuple(native.images[0].shape) == (3, 3, 4)


def test_train_end_to_end_on_parquet(tmp_path):
    from pixformer import TrainConfig, train
    hf_dataset(pictures(48, size=(12, 12), seed=13), labels_of(48)).to_parquet(str(tmp_path / "d.parquet"))
    r = train(TrainConfig(model="vit-n/4", data=str(tmp_path / "d.parquet"), img_size=8, epochs=1, batch_size=16,
                          model_args=dict(depth=1, dim=16, heads=2), progress=False, out=str(tmp_path / "run")))
    assert np.isfinite(r["val_loss"]) and r["val_n"] > 0


def test_eval_names_the_columns_of_another_dataset(tmp_path, capsys):
    import json
    from pixformer.cli import main
    write_table(tmp_path / "d.parquet", {"image": image_struct(pictures(40, size=(8, 8))), "label": labels_of(40, 2)})
    write_table(tmp_path / "e.parquet", {"pic": image_struct(pictures(10, size=(8, 8), seed=1)),
                                         "klass": labels_of(10, 2)})
    tiny = ["--model", "vit-n/4", "--depth", "1", "--dim", "16", "--heads", "2", "--batch-size", "8"]
    assert main(["train", *tiny, "--data", str(tmp_path / "d.parquet"), "--epochs", "1", "--out",
                 str(tmp_path / "run"), "--progress", "false"]) == 0
    eval_e = ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "e.parquet"), "--split", "train"]
    capsys.readouterr()
    assert main(eval_e) == 2 and "--image-column" in capsys.readouterr().err
    assert main([*eval_e, "--image-column", "pic", "--label-column", "klass", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 9
