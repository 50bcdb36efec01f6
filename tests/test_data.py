import gzip
import hashlib
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pixformer import PixformerError
from pixformer.data.augment import batch_indices, mix, random_crop, random_flip, resize
from pixformer.data.sources import download, file_md5, load_source, read_idx
from pixformer.data.splits import channel_stats, holdout, resolve_splits


def write_cifar(root, n_train=6, n_test=4, classes=("cat", "dog", "ship")):
    """A miniature of the official cifar-10-batches-py layout (5 train batches, 1 test batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in classes]}))
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, len(classes), n_train)]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 0][:n_test]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    return folder, test


def test_cifar_folder_and_archive(tmp_path):
    folder, test = write_cifar(tmp_path / "dir")
    splits = load_source("cifar10", str(tmp_path / "dir"))
    assert splits["train"].images.shape == (30, 3, 32, 32)
    assert splits["train"].images.dtype == torch.uint8
    assert splits["test"].classes == ["cat", "dog", "ship"]
    # row-major CHW layout of the pickle: the first 1024 bytes are the red plane
    assert torch.equal(splits["test"].images[1, 0].flatten(), torch.from_numpy(test[b"data"][1, :1024]))
    assert splits["test"].labels.tolist() == [0, 1, 2, 0]
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_tar = load_source("cifar10", str(tmp_path), img_size=(16, 16))
    assert from_tar["train"].images.shape == (30, 3, 16, 16)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder, _ = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(PixformerError, match="not a readable CIFAR batch"):
        load_source("cifar10", str(tmp_path))


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_idx_reader_and_mnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(y))  # plain files work too
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte").shape == (3,)
    splits = load_source("mnist", str(tmp_path))
    assert splits["train"].images.shape == (7, 1, 28, 28) and splits["test"].labels.shape == (3,)
    (tmp_path / "bad").write_bytes(idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3])
    with pytest.raises(PixformerError, match="truncated"):
        read_idx(tmp_path / "bad")
    (tmp_path / "bad").write_bytes(idx_bytes(np.zeros((4, 2, 2), np.uint8))[:6])     # cut inside the header
    with pytest.raises(PixformerError, match="truncated: its header is cut short"):
        read_idx(tmp_path / "bad")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((4, 2, 2), np.uint8)))[:-9])   # a cut download
    with pytest.raises(PixformerError, match="bad.gz is a damaged gzip file .*: delete it, and it is downloaded again"):
        read_idx(tmp_path / "bad.gz")


def write_image_folder(root, classes=("a", "b"), per_class=3, size=(10, 12)):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_image_folder_directory_and_tar(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    splits = load_source(str(root))
    assert list(splits) == ["all"]
    assert splits["all"].images.shape == (6, 3, 10, 12) and splits["all"].classes == ["a", "b"]
    assert splits["all"].labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.array(Image.open(root / "a" / "0.png")).transpose(2, 0, 1).copy()
    assert torch.equal(splits["all"].images[0], torch.from_numpy(first))
    # an archive with split folders above the class folders
    tar_path = tmp_path / "set.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root, arcname="set/train")
        tar.add(root / "b", arcname="set/test/b")
    splits = load_source(str(tar_path), img_size=(8, 8))
    assert splits["train"].images.shape == (6, 3, 8, 8)
    assert splits["test"].images.shape == (3, 3, 8, 8) and splits["test"].labels.tolist() == [1, 1, 1]
    (tmp_path / "fake.tar.gz").write_text("not an archive")             # one line, not each compression tried
    with pytest.raises(PixformerError, match=r"fake.tar.gz is neither a directory nor a readable tar archive \(not "
                                             r"a tar archive, plain or gzip / bzip2 / xz compressed\)$"):
        load_source(str(tmp_path / "fake.tar.gz"))


def test_image_folder_is_decoded_once(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs")
    first = load_source(str(root))
    calls = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: calls.append(1))
    again = load_source(str(root))
    assert not calls and torch.equal(first["all"].images[:], again["all"].images[:])


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(PixformerError, match=r"cannot read image .*broken\.jpg.*--skip-bad-images"):
        load_source(str(root))
    splits = load_source(str(root), skip_bad_images=True)
    assert len(splits["all"]) == 6
    (root / "a" / "gone.png").symlink_to(tmp_path / "nothing.png")    # a link to nothing is no image
    assert len(load_source(str(root), skip_bad_images=True)["all"]) == 6


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(PixformerError, match="does not exist"):
        load_source(str(tmp_path / "nowhere"))
    with pytest.raises(PixformerError, match="unknown data source 'imagenet'"):
        load_source("imagenet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixformerError, match="no images in class folders"):
        load_source(str(tmp_path / "empty"))


def test_download_checks_the_checksum(tmp_path):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"pixformer" * 100)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = download(src.as_uri(), tmp_path / "dl" / "file.bin", md5)
    assert file_md5(dest) == md5
    assert dest.stat().st_mode & 0o777 == (tmp_path / "remote.bin").stat().st_mode & 0o777   # not mkstemp's 0600
    with pytest.raises(PixformerError, match="checksum mismatch"):
        download(src.as_uri(), tmp_path / "dl" / "other.bin", "0" * 32)
    assert not (tmp_path / "dl" / "other.bin").exists()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["file.bin"]  # no partial files left
    with pytest.raises(PixformerError, match="could not download"):
        download((tmp_path / "missing").as_uri(), tmp_path / "dl" / "x.bin", md5)


def test_digits_default_dataset_has_fixed_test_split():
    a, b = load_source("digits"), load_source("digits")
    assert len(a["train"]) + len(a["test"]) == 1797 and len(a["test"]) == 359
    assert torch.equal(a["test"].labels, b["test"].labels)
    assert a["train"].images.shape[1:] == (1, 8, 8) and a["train"].images.max() == 255


def test_holdout_is_deterministic_and_disjoint():
    tr, va = holdout(100, 0.1, seed=0)
    tr2, va2 = holdout(100, 0.1, seed=0)
    assert torch.equal(va, va2) and len(va) == 10 and len(tr) == 90
    assert set(tr.tolist()).isdisjoint(va.tolist())


def test_batches_cover_each_epoch_and_differ_between_epochs():
    e0, e1 = batch_indices(10, 4, 0, 0), batch_indices(10, 4, 1, 0)
    assert [len(b) for b in e0] == [4, 4] and len(set(torch.cat(e0).tolist())) == 8
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    assert torch.equal(torch.cat(batch_indices(10, 4, 0, 0, shuffle=False)), torch.arange(10))


def test_augmentations_are_batch_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    crops = random_crop(x, 1, g)
    assert crops.shape == x.shape
    for i in range(2):  # each crop is a shifted window of the zero-padded image
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        windows = [padded[:, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        assert any(torch.equal(crops[i], w) for w in windows)
    flips = random_flip(x, torch.Generator().manual_seed(3))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flips, x))
    y = torch.eye(2)
    mx, my = mix(x, y, 0.8, 0.0, np.random.default_rng(0))
    torch.testing.assert_close(my.sum(1), torch.ones(2))
    cx, cy = mix(x, y, 0.0, 1.0, np.random.default_rng(0))
    assert cx.shape == x.shape and torch.allclose(cy.sum(1), torch.ones(2))


def test_resize_is_identity_at_same_size():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    assert resize(x, (8, 8)) is x
    assert resize(x, (4, 6)).shape == (3, 3, 4, 6)


# ---- splits: train / val / test -----------------------------------------------------------------
def split_folder(root, splits=("train", "val", "test"), per_class=(6, 3, 2)):
    for split, n in zip(splits, per_class):
        write_image_folder(root / split, per_class=n, size=(8, 8))
    return root


def test_train_val_test_folders_stay_three_splits(tmp_path):
    root = split_folder(tmp_path / "set")
    found = load_source(str(root))
    assert sorted(found) == ["test", "train", "val"]
    s = resolve_splits(found, 0.1, "set")
    assert (len(s.train), len(s.val), len(s.test), s.val_from) == (12, 6, 4, "val split")
    # without a val folder: a seeded hold-out of train validates, test stays test
    s = resolve_splits(load_source(str(split_folder(tmp_path / "tt", ("train", "test"), (10, 2)))), 0.25, "tt")
    assert (len(s.train), len(s.val), len(s.test), s.val_from) == (15, 5, 4, "held out of train")


def test_training_validates_on_val_and_reports_test_apart(tmp_path):
    from pixformer import TrainConfig, train
    root = split_folder(tmp_path / "set")
    r = train(TrainConfig(model="vit-n/4", data=str(root), model_args=dict(depth=1, dim=16, heads=2), epochs=1,
                          batch_size=4, progress=False, out=str(tmp_path / "run")))
    assert (r["val_n"], r["test_n"]) == (6, 4)


@pytest.mark.parametrize("found,fraction,match", [
    ({"test"}, 0.1, r"has no training images: it holds only \['test'\] split folder"),
    ({"val", "test"}, 0.1, "has no training images"),
    ({"train"}, 0.0, r"--val-fraction must be between 0 and 1 \(exclusive\), got 0.0"),
    ({"train"}, 1.0, "--val-fraction must be between 0 and 1"),
    ({"train"}, 0.01, "leaves 6 to train on and 0 to validate on"),
])
def test_split_mistakes_are_one_line_errors(tmp_path, found, fraction, match):
    sets = load_source(str(split_folder(tmp_path / "s", ("train", "val", "test"), (3, 1, 1))))
    with pytest.raises(PixformerError, match=match):
        resolve_splits({k: v for k, v in sets.items() if k in found}, fraction, "s")


def test_an_empty_training_set_is_refused():
    empty = load_source("digits")["train"].subset(torch.tensor([], dtype=torch.long))
    with pytest.raises(PixformerError, match="empty training set"):
        resolve_splits({"train": empty}, 0.1, "digits")


# ---- the decode cache and image sizes -----------------------------------------------------------
def test_decode_cache_sees_every_file(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    before = load_source(str(root))["all"]
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "b" / "new.png")      # one image added
    added = load_source(str(root))["all"]
    assert len(added) == len(before) + 1
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(root / "a" / "0.png")      # one image replaced
    replaced = load_source(str(root))["all"]
    assert (replaced.images[0] == 7).all() and not (before.images[0] == 7).all()


def test_images_of_different_sizes_need_an_image_size(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "b" / "big.png")
    with pytest.raises(PixformerError, match=r"different sizes \(height x width: 10x12 a/0\.png, 20x30 b/big\.png\); "
                                             r"pass --img-size N"):
        load_source(str(root))
    assert load_source(str(root), img_size=(8, 8))["all"].images.shape == (7, 3, 8, 8)


# ---- statistics and augmentation order ----------------------------------------------------------
def test_channel_stats_in_chunks_equal_the_whole_set_at_once():
    x = torch.randint(0, 256, (50, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=7)
    flat = x.transpose(0, 1).reshape(3, -1).double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), flat.mean(1))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), flat.std(1))


def test_crop_padding_is_black_because_it_comes_before_normalisation():
    images = torch.full((64, 1, 4, 4), 200, dtype=torch.uint8)
    crops = random_crop(images, 2, torch.Generator().manual_seed(0))
    assert crops.dtype == torch.uint8 and set(crops.unique().tolist()) == {0, 200}
