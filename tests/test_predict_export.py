"""Using a trained model: `pixformer predict` / pixformer.predict (the run's own preprocessing, so a
training image gets eval's probabilities), `pixformer export` to ONNX (outputs equal PyTorch's under
onnxruntime) and to the Hugging Face Hub layout (a local folder round trip, offline)."""
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pixformer
from pixformer import PixformerError, TrainConfig, train
from pixformer.cli import main

TINY = dict(model_args=dict(depth=1, dim=16, heads=2), progress=False,
            precision="fp32")   # fp32: batches of other sizes round alike (bf16 CPUs would differ by ~1e-3)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def photo_folder(root: Path, classes=("cat", "dog", "frog"), per_class=8, seed=0) -> Path:
    """RGB PNGs of random sizes, each class a bright band at its own rows (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(10, 30)), int(rng.integers(10, 30))
            arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            arr[h * k // 3: h * (k + 1) // 3] = 255
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def reference(run, data_source, split="test"):
    """Class probabilities of `eval`'s path: the run's split of `data_source` through the model, as
    engine.evaluate makes its inputs (batcher for native runs, task.inputs, the run's autocast)."""
    from pixformer.data.native import batcher_for
    from pixformer.models import token_layout
    from pixformer.data.splits import run_split
    from pixformer.data.store import pick
    from pixformer.engine.perf import autocast_dtype
    from pixformer.tasks import task_of
    model, state = pixformer.load_model(run)
    data, _ = run_split(state, data_source, None, split)
    task, batcher = task_of(state), batcher_for(state["train_config"], *token_layout(model), "cpu")
    amp = autocast_dtype(state["train_config"]["precision"], "cpu")
    x = batcher(pick(data.images, torch.arange(len(data))), task.inputs) if batcher else task.inputs(data.images[:])
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        return model(x).float().softmax(-1), state


def assert_same(results, probs, classes):
    """predict's results carry exactly the top-k of `probs` (row i: result i)."""
    assert len(results) == len(probs)
    for r, p in zip(results, probs):
        top = p.topk(len(r["predictions"]))
        assert [q["index"] for q in r["predictions"]] == top.indices.tolist()
        assert [q["class"] for q in r["predictions"]] == [classes[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([q["probability"] for q in r["predictions"]], top.values.tolist(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A square run (img_size 8) on a folder of photos of any size, and a separate test folder."""
    root = tmp_path_factory.mktemp("photos")
    data, test = photo_folder(root / "train", per_class=16), photo_folder(root / "test", per_class=4, seed=1)
    train(TrainConfig(model="vit-n/2", data=str(data), img_size=8, epochs=3, batch_size=8, lr=3e-3,
                      out=str(root / "run"), **TINY))
    return root / "run", data, test


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A one-channel digits run whose pixels are permuted (a locality ablation), with a class token."""
    root = tmp_path_factory.mktemp("digits")
    train(TrainConfig(model="vit-n/4", data="digits", epochs=1, train_subset=128, batch_size=32, permute_pixels=True,
                      out=str(root / "run"), **TINY))
    return root / "run"


def test_predict_equals_eval_on_the_runs_own_preprocessing(photos, capsys):
    run, _, test = photos
    probs, state = reference(run, str(test))
    results = pixformer.predict(run, test, top_k=2, batch_size=5)             # a folder, searched recursively
    assert [Path(r["image"]).relative_to(test).parts[0] for r in results] == ["cat"] * 4 + ["dog"] * 4 + ["frog"] * 4
    assert_same(results, probs, state["data"]["classes"])
    # eval's top-1 on the same folder is the share of images whose most probable class is their folder
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", run, "--data", test, "--json")
    assert code == 0
    top1 = np.mean([r["predictions"][0]["class"] == Path(r["image"]).parent.name for r in results])
    assert json.loads(out.splitlines()[-1])["top1"] == pytest.approx(top1)
    # the same from a loaded Predictor, one image object at a time (a PIL image, an array, a tensor)
    predictor = pixformer.Predictor(run)
    first = sorted((test / "cat").iterdir())[0]
    arr = np.array(Image.open(first))
    for obj in (Image.open(first), arr, torch.from_numpy(arr).permute(2, 0, 1)):
        (got,) = predictor.predict(obj, top_k=2)
        assert got["image"] == 0
        assert_same([got], probs[:1], state["data"]["classes"])


def test_predict_command_table_json_csv_and_refusals(photos, tmp_path, capsys):
    run, _, test = photos
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", run, test / "dog", test / "cat" / "0.png")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["image", "top-3"] and len(lines) == 1 + 4 + 1   # 3 classes at most
    # a bare flag before the paths; JSON Lines: one object an image
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", run, "--json", "--top-k", "2", f"{test}/*/1.png")
    rows = [json.loads(l) for l in out.splitlines()]
    assert code == 0 and [Path(r["image"]).parent.name for r in rows] == ["cat", "dog", "frog"]
    assert all(len(r["predictions"]) == 2 and r["predictions"][0]["probability"] >= r["predictions"][1]["probability"]
               for r in rows)
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", run, test / "frog", "--csv", "--top-k", "1")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(table) == 4 and set(table[0]) == {"image", "rank", "class", "index", "probability"}
    # refusals, each in one line
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    for args, message in [((tmp_path / "nope.png",), "does not exist"), ((tmp_path / "empty",), "holds no images"),
                          ((f"{tmp_path}/*.jpg",), "no file matches"), ((bad,), f"cannot read {bad}"),
                          ((test, "--json", "--csv"), "choose one of --json and --csv"),
                          ((test, "--top-k", "0"), "--top-k must be at least 1, got 0"),
                          ((test, "--batch-size", "-5"), "--batch-size must be at least 1, got -5")]:
        code, out, err = run_cli(capsys, "predict", "--checkpoint", run, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli(capsys, "predict", "--checkpoint", run, bad, test / "cat" / "0.png", "--skip-bad-images")
    assert code == 0 and f"skipped {bad}" in err and len(out.splitlines()) == 2


def test_progress_is_plain_lines_off_a_terminal(capsys):
    from pixformer.experiments.predict import Progress
    with Progress(128, "predict", every=0) as progress:           # stderr is not a terminal under pytest
        progress.update(64)
        progress.update(64)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("predict: 64/128 images (50 %)") and lines[-1].startswith("predict: 128/128 images")
    with Progress(128, "predict", show=False, every=0) as progress:
        progress.update(128)
    assert capsys.readouterr().err == ""


def test_one_channel_permuted_run_reads_any_image_mode(digits, tmp_path):
    from pixformer.data.sources import load_source
    probs, state = reference(digits, None)                         # digits' test split, its pixels permuted
    raw = load_source("digits")["test"].images[:3, 0].numpy()      # (3, 8, 8) uint8, as stored (not permuted)
    files = []
    for i, a in enumerate(raw):                                    # one image in every mode: the same pixels
        rgb = np.repeat(a[..., None], 3, axis=2)
        for mode, im in [("L", Image.fromarray(a)), ("RGB", Image.fromarray(rgb)),
                         ("RGBA", Image.fromarray(np.dstack([rgb, np.full_like(a, 255)]))),
                         ("P", Image.fromarray(rgb).quantize(256, method=Image.Quantize.MAXCOVERAGE)),
                         ("I16", Image.fromarray(a.astype(np.uint16) * 257))]:
            if mode == "P":
                assert np.array_equal(np.asarray(im.convert("L")), a)   # a lossless palette
            files.append(tmp_path / f"{i}-{mode}.png")
            im.save(files[-1])
    results = pixformer.predict(digits, files, top_k=10, batch_size=7)
    assert_same(results, probs[np.repeat(np.arange(3), 5)], state["data"]["classes"])
    assert Image.open(files[4]).mode.startswith("I;16")              # a 16-bit file: scaled, not clipped to white


def test_a_named_dataset_resized_by_the_run_is_resized_alike(tmp_path):
    """digits trained at --img-size 16 (its 8x8 arrays resized by torch, not by PIL): predict on the
    8x8 images saved as PNG gives eval's probabilities, and the ONNX side file names that resize."""
    from pixformer.data.sources import load_source
    train(TrainConfig(model="vit-n/4", data="digits", img_size=16, epochs=1, train_subset=64, batch_size=32,
                      out=str(tmp_path / "run"), **TINY))
    probs, state = reference(tmp_path / "run", None)
    files = []
    for i, a in enumerate(load_source("digits")["test"].images[:4, 0].numpy()):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(files[-1])
    assert_same(pixformer.predict(tmp_path / "run", files, top_k=3), probs[:4], state["data"]["classes"])


def test_native_resolution_run_packs_as_eval(tmp_path):
    data = photo_folder(tmp_path / "photos", per_class=6)
    train(TrainConfig(model="vit-n/4", data=str(data), max_side=24, pack_length=48, epochs=1, batch_size=4,
                      val_fraction=0.25, out=str(tmp_path / "run"), **TINY))
    test = photo_folder(tmp_path / "test", per_class=2, seed=3)
    probs, state = reference(tmp_path / "run", str(test))
    for batch in (1, 4):                                           # packing never changes an image's result
        results = pixformer.predict(tmp_path / "run", test, top_k=3, batch_size=batch)
        assert_same(results, probs, state["data"]["classes"])
    with pytest.raises(PixformerError, match="native-resolution run"):
        pixformer.export_onnx(tmp_path / "run", tmp_path / "m.onnx")


def test_mae_run_is_refused_in_one_line(tmp_path, capsys):
    train(TrainConfig(task="mae", model="pit-n", data="digits", epochs=1, train_subset=64, batch_size=64,
                      task_args=dict(decoder_depth=1, decoder_dim=16, decoder_heads=2, samples=4),
                      out=str(tmp_path / "mae"), **TINY))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    for args in (("predict", "--checkpoint", tmp_path / "mae", tmp_path / "x.png"),
                 ("export", "--checkpoint", tmp_path / "mae", "--format", "onnx", "--out", tmp_path / "m.onnx")):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and "is a mae run" in err and len(err.strip().splitlines()) == 1, err


def test_ema_weights_of_a_run_without_them_are_one_line(photos, capsys):
    run, _, test = photos
    with pytest.raises(PixformerError, match="this run kept no EMA weights"):
        pixformer.predict(run, test, weights="ema")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", run, "--weights", "ema")
    assert code == 2 and "this run kept no EMA weights" in err and len(err.strip().splitlines()) == 1, err


def onnx_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": x.numpy()})[0]


@pytest.mark.parametrize("which", ["vit", "convmixer"])
def test_onnx_export_equals_pytorch_for_any_batch(which, digits, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = digits
    if which == "convmixer":          # a run evaluated with its mirror images: the graph averages both
        run = tmp_path / "convmixer"
        train(TrainConfig(model="convmixer-16/1", data="digits", epochs=1, train_subset=64, batch_size=32,
                          out=str(run), progress=False, precision="fp32", task_args={"eval_flip": True}))
    code, out, _ = run_cli(capsys, "export", "--checkpoint", run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 0 and "m.onnx" in out
    model, state = pixformer.load_model(run)
    side = json.loads((tmp_path / "m.preprocess.json").read_text())
    assert side["mean"] == state["data"]["mean"] and side["std"] == state["data"]["std"]
    assert side["classes"] == state["data"]["classes"] and side["input_shape"] == ["batch", 1, 8, 8]
    assert (side["pixel_permutation"] is not None) == (which == "vit")       # the digits run permutes its pixels
    assert side["mirror_averaged"] == (which == "convmixer")
    mirrored = (lambda x: (model(x) + model(x.flip(-1))) / 2) if which == "convmixer" else model
    for batch in (1, 3):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            expected = mirrored(x).numpy()
            assert which == "vit" or not np.allclose(model(x).numpy(), expected, atol=1e-4)   # the mirror counts
        np.testing.assert_allclose(onnx_outputs(tmp_path / "m.onnx", x), expected, rtol=0, atol=1e-4)
    if which == "convmixer":                             # predict classifies as eval does: with the mirror image
        from pixformer.tasks import task_of
        images = [torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8) for _ in range(3)]
        with torch.no_grad():
            probs = mirrored(task_of(state).inputs(torch.stack(images))).softmax(-1)
        assert_same(pixformer.Predictor(run).predict(images, top_k=3), probs, state["data"]["classes"])


def test_onnx_export_replaces_only_its_own_files_and_writes_the_opset_asked(digits, tmp_path, capsys):
    """An earlier export is replaced; any other file at --out is refused before the model loads, and kept.
    An opset no onnx defines is refused at once; one the model cannot be converted down to is refused
    with nothing written (torch.onnx's converter keeps its default opset where it cannot go back)."""
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    for _ in range(2):
        code, _, err = run_cli(capsys, "export", "--checkpoint", digits, "--format", "onnx", "--out", out,
                               "--opset", "17")
        assert code == 0, err
    assert onnx.load(out).opset_import[0].version == 17
    (tmp_path / "mine.onnx").write_text("my own model")
    for name, opset in (("mine.onnx", "18"), ("new.onnx", "99"), ("new.onnx", "3")):
        code, _, err = run_cli(capsys, "export", "--checkpoint", digits, "--format", "onnx", "--out",
                               tmp_path / name, "--opset", opset)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert {"mine.onnx": "is not an earlier export", "99": "opsets run from 1 to",
                "3": "cannot convert"}[name if opset == "18" else opset] in err
    assert (tmp_path / "mine.onnx").read_text() == "my own model" and not (tmp_path / "new.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.preprocess.json", "mine.onnx"]


def test_hub_layout_round_trips_offline(photos, tmp_path, capsys, monkeypatch):
    run, _, test = photos
    folder = tmp_path / "hub"
    code, _, _ = run_cli(capsys, "export", "--checkpoint", run, "--format", "hf", "--out", folder)
    assert code == 0 and {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    mask = os.umask(0o022)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~mask}    # none private to its owner
    config = json.loads((folder / "config.json").read_text())
    model, state = pixformer.load_model(run)
    assert config["model"] == state["model"] and config["data"]["classes"] == state["data"]["classes"]
    assert config["data"]["mean"] == state["data"]["mean"] and str(tmp_path) not in (folder / "config.json").read_text()
    assert str(run.parent) not in (folder / "config.json").read_text()        # no local paths travel
    hub = pixformer.load_hub(folder)
    assert "pixformer predict --checkpoint you/mine" in str(hub.generate_model_card(repo_id="you/mine"))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(hub(x), model(x))
    assert pixformer.predict(folder, test) == pixformer.predict(run, test) == pixformer.predict(hub, test)
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", folder, test / "cat", "--json")
    assert code == 0 and len(out.splitlines()) == 4
    assert run_cli(capsys, "export", "--checkpoint", run, "--format", "hf", "--out", folder)[0] == 0   # again: replaced
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    (folder / "config.json").unlink()                  # an export killed before its config went in: replaced too
    (folder / ".export.tmp-x1y2").mkdir()                # (with the folder it was writing in)
    assert run_cli(capsys, "export", "--checkpoint", run, "--format", "hf", "--out", folder)[0] == 0
    assert json.loads((folder / "config.json").read_text())["library"] == "pixformer"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    theirs = tmp_path / "transformers-model"            # another library's model in the Hub layout: not ours
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "vit"}')
    (theirs / "model.safetensors").write_bytes(b"weights")
    for out, source in ((test, run), (test, folder), (theirs, run)):   # (folder: from a Hub folder)
        code, _, err = run_cli(capsys, "export", "--checkpoint", source, "--format", "hf", "--out", out)
        assert code == 2 and "holding files other than an earlier pixformer export's" in err
    assert (theirs / "model.safetensors").read_bytes() == b"weights"
    (folder / "model.safetensors").unlink()
    with pytest.raises(PixformerError, match="no model.safetensors"):
        pixformer.load_hub(folder)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # a repository id: looked up, never fetched
    code, _, err = run_cli(capsys, "predict", "--checkpoint", "nobody/no-such-model", test / "cat")
    assert code == 2 and "nobody/no-such-model" in err and len(err.strip().splitlines()) == 1, err


def test_a_mistyped_run_folder_is_one_line_not_a_hub_lookup(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    from pixformer.experiments import hub
    monkeypatch.setattr(hub, "load_hub", lambda *a, **k: pytest.fail("asked the Hub for a local path"))
    code, _, err = run_cli(capsys, "predict", "--checkpoint", "runs/nope", "x.png")
    assert code == 2 and "runs/nope does not exist" in err and len(err.strip().splitlines()) == 1, err


def test_a_mistyped_path_on_a_machine_without_the_hub_is_one_line_at_once(tmp_path, capsys, monkeypatch):
    """`rusn/mine` (no such folder, so a Hub id): where the Hub's host has no address, huggingface_hub's
    cache alone is asked (no half a minute of retries), and a model cached there still loads."""
    import socket
    monkeypatch.chdir(tmp_path)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")

    def no_address(host, *a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_address)
    from pixformer.experiments import hub
    asked = []

    def cache_only(source, **kwargs):                   # huggingface_hub with nothing cached
        asked.append(kwargs)
        raise OSError(f"{source} is not in the cache")
    monkeypatch.setattr(hub.HubModel, "from_pretrained", cache_only)
    code, _, err = run_cli(capsys, "predict", "--checkpoint", "rusn/mine", "x.png")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "rusn/mine is not a model folder, and the Hub (huggingface.co: Name or service not known) cannot be " \
           "reached to look for it, nor is it in huggingface_hub's cache" in err, err
    assert asked == [{"local_files_only": True}]
    monkeypatch.setattr(hub.HubModel, "from_pretrained", lambda source, **kwargs: ("cached", kwargs))
    assert hub.load_hub("you/cached") == ("cached", {"local_files_only": True})    # a cached model loads offline
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")                      # a proxy resolves the Hub's name
    assert hub.load_hub("you/cached") == ("cached", {})
