"""A newcomer's toolkit: progress for what takes seconds, TensorBoard's notice, `analyze` on every run
type, figures whose labels fit and whose grids have a column per class, and bad inputs that are one
line and exit 2 (never a traceback, never silent), each before any work."""
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixformer import PixformerError, TrainConfig, train
from pixformer.cli import main
from pixformer.data.cache import decode_image
from pixformer.data.sources import load_source
from pixformer.progress import Progress
from pixformer.tasks.figures import grid_captions, grid_columns, written
from pixformer.tasks.mae import spread_over_classes

TINY = dict(model="vit-n/4", data="digits", model_args=dict(depth=1, dim=16, heads=2), epochs=1, train_subset=64,
            batch_size=32, progress=False)
TINY_CLI = ["--model", "vit-n/4", "--depth", "1", "--dim", "16", "--heads", "2", "--epochs", "1", "--train-subset",
            "64", "--batch-size", "32", "--progress", "false"]


def one_line_error(capsys, args, code=2) -> str:
    """Run the command; it must exit `code` with one line on stderr and no traceback."""
    got = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def png_folder(root: Path, classes, n: int = 6, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def png_bytes(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tar_of(path: Path, members: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name in members:
            data = png_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vit"
    train(TrainConfig(**TINY, out=str(out)))
    return out


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mae"
    train(TrainConfig(**{**TINY, "task": "mae", "task_args": dict(decoder_depth=1, decoder_dim=16, decoder_heads=2,
                                                                   samples=8)}, out=str(out)))
    return out


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dit"
    train(TrainConfig(**{**TINY, "task": "diffusion", "model": "dit-n/4", "task_args": dict(samples=12, sample_steps=2)},
                      out=str(out)))
    return out


# ---- progress ---------------------------------------------------------------------------------------
def test_progress_is_plain_lines_off_a_terminal_and_silent_when_asked(capsys):
    with Progress(5000, "validating", every=0.0) as p:
        p.t0 -= 10                                         # as if it had run 10 s
        p.update(3000)
        p.update(2000)
    err = capsys.readouterr().err
    assert "validating: 3,000/5,000 images (60 %), 300 img/s, about 6.7 s left" in err
    assert "validating: 5,000/5,000 images (100 %)" in err.splitlines()[-1] and "\r" not in err
    with Progress(5000, "validating", every=0.0, show=False) as p:
        p.update(5000)
    with Progress(5000, "validating") as p:           # quick work says nothing before its first 10 s
        p.update(5000)
    assert capsys.readouterr().err == ""


def test_training_validation_and_test_progress_in_a_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIXFORMER_PROGRESS_EVERY", "0")
    train(TrainConfig(**{**TINY, "progress": True}, out=str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert "training vit-d1w16h2/4 on digits: 1/2 steps (50 %)" in err and ", epoch 1, loss " in err
    assert "validating: " in err and "testing: 359/359 images (100 %)" in err and "\r" not in err
    train(TrainConfig(**TINY, out=str(tmp_path / "quiet")))             # progress=False: not a word
    assert capsys.readouterr().err == ""


def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "pixformer", "train", *TINY_CLI[:-2], "--out", str(tmp_path / "r")],
                              stderr=f, stdout=subprocess.DEVNULL, env={**os.environ, "PIXFORMER_PROGRESS_EVERY": "0"},
                              cwd=tmp_path)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "training vit-d1w16h2/4 on digits: 2/2 steps (100 %)" in text


# ---- TensorBoard ------------------------------------------------------------------------------------
def test_tensorboard_asked_for_and_missing_is_said_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # as if tensorboard were not installed
    monkeypatch.setattr("pixformer.engine.loop._TENSORBOARD_SAID", [])
    train(TrainConfig(**TINY, out=str(tmp_path / "default")))             # unset: on when installed, silent
    assert "TensorBoard" not in capsys.readouterr().out
    for name in ("a", "b"):
        train(TrainConfig(**TINY, tensorboard=True, out=str(tmp_path / name)))
    out = capsys.readouterr().out
    assert out.count("no TensorBoard logs: tensorboard is not installed (pip install -e '.[tensorboard]' in the "
                     "pixformer checkout)") == 1
    assert not (tmp_path / "a" / "tb").exists() and (tmp_path / "a" / "metrics.jsonl").exists()


# ---- analyze on every run type ----------------------------------------------------------------------
FIGURES = ["patch_embed_pca", "pos_embed_similarity", "attention_distance", "attention_maps"]


def analysed(run: Path, capsys) -> dict:
    assert main(["analyze", "--checkpoint", str(run), "--num-images", "4"]) == 0, capsys.readouterr().err
    summary = json.loads((run / "analysis" / "analysis.json").read_text())
    assert all(summary[name]["applies"] for name in FIGURES), summary
    return summary


def test_analyze_an_mae_run_reads_its_encoder(mae_run, capsys):
    analysed(mae_run, capsys)
    maps = json.loads((mae_run / "analysis" / "attention_maps.json").read_text())
    assert maps["predicted"] is None and len(maps["rollout"]) == 2                  # 8x8 digits, 2x2 tokens


def test_analyze_a_probe_run_reads_its_encoder_and_predicts(mae_run, tmp_path, capsys):
    probe = tmp_path / "probe"
    train(TrainConfig(**{**TINY, "task": "probe"}, init=str(mae_run), out=str(probe)))
    analysed(probe, capsys)
    maps = json.loads((probe / "analysis" / "attention_maps.json").read_text())
    assert maps["predicted"] in [str(d) for d in range(10)]


def test_analyze_a_native_resolution_run_at_its_tables_square(tmp_path, capsys):
    run = tmp_path / "native"
    train(TrainConfig(**TINY, max_side=8, out=str(run)))
    analysed(run, capsys)
    dist = json.loads((run / "analysis" / "attention_distance.json").read_text())
    assert "resized to 8x8" in dist["images"]


def test_analyze_refuses_a_diffusion_run_in_one_line(dit_run, capsys):
    err = one_line_error(capsys, ["analyze", "--checkpoint", dit_run])
    assert "is a diffusion run (DiT)" in err and not (dit_run / "analysis").exists()


# ---- figures ----------------------------------------------------------------------------------------
def test_grid_layouts():
    assert grid_columns(16, 10) == 10 and grid_columns(4, 10) == 4 and grid_columns(16, 100) == 8
    assert grid_columns(5, 0) == 5
    names = [str(i % 3) for i in range(7)]
    assert grid_captions(names, 3) == [["0", "1", "2"], ["", "", ""], [""]]     # one column per class: top row
    assert grid_captions(names, 2)[1] == ["2", "0"]                             # otherwise each image named
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)                          # a split sorted by class
    assert spread_over_classes(labels, 8).tolist() == [0, 5, 10, 1, 2, 3, 4, 6]


def test_sample_grid_has_one_column_per_class(dit_run, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(dit_run), "--num", "12", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    grid = Image.open(tmp_path / "s" / "grid.png")
    cell = 8 * 16 + 2                                         # 8x8 digits drawn 16x, 2 px apart
    assert grid.width == 10 * cell + 2                        # the ten digit classes, one column each
    assert grid.height > 2 * cell + 2                         # two rows and the class names above them
    saved = np.load(tmp_path / "s" / "samples.npz")
    assert saved["labels"].tolist() == [*range(10), 0, 1] and len(list((tmp_path / "s" / "images").iterdir())) == 12


def test_eval_resolutions_prints_its_table_then_writes_its_files(classifier_run, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(classifier_run), "--resolutions", "8,16", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.index("res     top1") < out.index("wrote ")
    assert len(json.loads((tmp_path / "r" / "resolutions.json").read_text())) == 2
    assert Image.open(tmp_path / "r" / "resolutions.png").width > 300


def test_run_figures_are_written(mae_run, dit_run):
    assert (mae_run / "reconstructions" / "epoch001.png").exists() and (dit_run / "samples" / "epoch001.png").exists()


# ---- bad data inputs: scaled or merged, not wrong ---------------------------------------------------
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = decode_image(str(tmp_path / "deep.png"), None, None)
    assert got.shape == (3, 8, 8) and got[0, 0, 0] == 0 and got[0, -1, -1] == 255
    assert np.abs(got[0].astype(int) - np.rint(ramp / 257).astype(int)).max() <= 1


def test_class_folders_equal_under_unicode_normalisation_are_one_class(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    root = png_folder(tmp_path / "imgs", [nfc, "dog"])
    png_folder(root, [nfd], n=3)
    found = load_source(str(root))["all"]
    assert found.classes == [nfc, "dog"] and found.labels.tolist().count(0) == 9


def test_eval_from_another_folder_finds_the_runs_own_data(tmp_path, capsys, monkeypatch):
    png_folder(tmp_path / "work" / "imgs", ["cat", "dog"], n=10)
    monkeypatch.chdir(tmp_path / "work")
    train(TrainConfig(**{**TINY, "data": "imgs", "train_subset": None}, out="run"))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", "work/run", "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2


def test_a_failed_write_keeps_the_old_file_and_names_the_path(tmp_path):
    path = tmp_path / "fig.png"
    path.write_text("old")
    with pytest.raises(PixformerError, match=r"^cannot write .*fig.png \(No space left on device\); the previous file is kept$"):
        with written(path) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]


# ---- bad inputs: one line, exit 2 -------------------------------------------------------------------
def copied_run(run: Path, tmp_path: Path, edit) -> Path:
    """A copy of `run` whose state.json is edit(state)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    path = copy / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps(edit(state)))
    return copy


def without(key):
    def edit(state):
        del state[key]
        return state
    return edit


CASES = {
    "one class": (lambda t, r: ["train", *TINY_CLI, "--data", png_folder(t / "one", ["cat"]), "--out", t / "o"],
                  "has 1 class (cat); a classifier needs at least 2"),
    "tar member ..": (lambda t, r: ["train", *TINY_CLI, "--out", t / "o", "--data",
                                    tar_of(t / "a.tar", ["cat/0.png", "dog/0.png", "../evil/0.png"])],
                      "holds the member '../evil/0.png', a path that leads out of it"),
    "tar member absolute": (lambda t, r: ["train", *TINY_CLI, "--out", t / "o", "--data",
                                          tar_of(t / "a.tar", ["cat/0.png", "/etc/cat/0.png"])],
                            "holds the member '/etc/cat/0.png'"),
    "tar member outside the splits": (lambda t, r: ["train", *TINY_CLI, "--out", t / "o", "--data", tar_of(
        t / "a.tar", ["train/cat/0.png", "train/dog/0.png", "extra/cat/0.png"])],
        "1 image(s) in", "lie outside its split folders (e.g. extra/cat/0.png)"),
    "tar member beside the splits": (lambda t, r: ["train", *TINY_CLI, "--out", t / "o", "--data", tar_of(
        t / "a.tar", ["train/cat/0.png", "train/dog/0.png", "stray.png"])],
        "1 image(s) in", "lie outside its split folders (e.g. stray.png)"),
    "out inside a checkpoint": (lambda t, r: ["train", *TINY_CLI, "--out", r("classifier_run") / "checkpoint",
                                              "--resume"], "lies inside the checkpoint folder"),
    "state.json a list": (lambda t, r: ["eval", "--checkpoint", copied_run(r("classifier_run"), t, lambda s: [s])],
                          "state.json is not a checkpoint's state"),
    "state.json without model": (lambda t, r: ["eval", "--checkpoint", copied_run(r("classifier_run"), t,
                                                                                  without("model"))],
                                 "state.json lacks the field 'model': not a pixformer checkpoint's state"),
    "state.json without data": (lambda t, r: ["eval", "--checkpoint", copied_run(r("classifier_run"), t,
                                                                                 without("data"))],
                                "state.json lacks the field 'data'"),
    "state.json without step": (lambda t, r: ["eval", "--checkpoint", copied_run(r("classifier_run"), t,
                                                                                 without("step"))],
                                "state.json lacks the field 'step'"),
    "init not safetensors": (lambda t, r: ["train", *TINY_CLI, "--init", file_with(t / "w.safetensors"), "--out",
                                           t / "o"], "w.safetensors is not a readable safetensors file"),
    "init a pickle": (lambda t, r: ["train", *TINY_CLI, "--init", file_with(t / "w.pt"), "--out", t / "o"],
                      "w.pt: not a pixformer run"),
    "analyze --out a file": (lambda t, r: ["analyze", "--checkpoint", r("classifier_run"), "--out", file_with(t / "f")],
                             "is a file, not a folder"),
    "analyze --out too long": (lambda t, r: ["analyze", "--checkpoint", r("classifier_run"), "--out", t / ("x" * 300)],
                               "File name too long"),
    "eval --resolutions --out a file": (lambda t, r: ["eval", "--checkpoint", r("classifier_run"), "--resolutions",
                                                      "8", "--out", file_with(t / "f")], "is a file, not a folder"),
    "sample --out a file": (lambda t, r: ["sample", "--checkpoint", r("dit_run"), "--num", "2", "--out",
                                          file_with(t / "f")], "is a file, not a folder"),
    "fid --samples labels out of range": (lambda t, r: ["fid", "--checkpoint", r("dit_run"), "--samples",
                                                        samples_npz(t / "s.npz", 99)],
                                          "holds label 99; the run has classes 0..9"),
    "fid --samples of another size": (lambda t, r: ["fid", "--checkpoint", r("dit_run"), "--samples",
                                                    samples_npz(t / "s.npz", 0, (100, 16, 16, 3))],
                                      "holds 16x16 images of 3 channel(s); the run makes 8x8 of 1"),
    "sweep --task mae": (lambda t, r: ["sweep", "--task", "mae", "--patches", "[4]", "--epochs", "1", "--out", t / "sw"],
                         "--task mae measures loss, not accuracy"),
}


def file_with(path: Path, content: bytes = b"\x80 not what the name says") -> Path:
    path.write_bytes(content)
    return path


def rgb_folder(root: Path) -> Path:
    """A class-folder tree of 8x8 RGB images (the test split of a source no run trained on)."""
    from PIL import Image
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def samples_npz(path: Path, label: int, shape=(100, 8, 8, 1)) -> Path:
    np.savez(path, images=np.zeros(shape, np.uint8), labels=np.full(shape[0], label), classes=np.arange(10))
    return path


def test_analyze_names_images_of_other_channels_rather_than_falling_back(classifier_run, tmp_path, capsys):
    """A test folder of RGB images for a run on grey ones: that is the error, not a retry of another split."""
    from pixformer.cli import main
    assert main(["analyze", "--checkpoint", str(classifier_run), "--data", str(rgb_folder(tmp_path / "rgb")),
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("has 3 channels; the model was trained on 1")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_before_any_work(case, tmp_path, capsys, request, monkeypatch):
    def no_inception(*a, **k):
        raise AssertionError("the Inception network was loaded before the samples were checked")
    monkeypatch.setattr("pixformer.experiments.quality.FeatureNet", no_inception)
    build, *messages = CASES[case]
    err = one_line_error(capsys, build(tmp_path, request.getfixturevalue))
    for message in messages:
        assert message in err
    assert not (tmp_path / "sw").exists()                 # the sweep refused before making its folder
