import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pixformer
from pixformer.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth", "1", "--dim", "16", "--heads", "2", "--batch-size", "32", "--progress", "false"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def image_folder(root, classes, per_class=12, size=8, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        k = ["cat", "dog", "frog", "a", "b", "bird"].index(c) % 4
        (root / c).mkdir(parents=True)
        for i in range(per_class):  # each class: a bright band at its own rows, learnable in a few steps
            arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            arr[2 * k: 2 * k + 2] = 255
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_train_then_eval_json_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--model", "vit-n/4", *TINY, "--epochs", "2", "--train-subset", "300",
                          "--out", out, "--seed", "1")
    assert code == 0 and f"run folder: {out}" in stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 2] and "test_top1" in rows[-1]   # 2 epochs, then the test split
    code, stdout, _ = run(capsys, "eval", "--checkpoint", out, "--data", "digits", "--json")
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["n"] == 359 and 0 <= result["top1"] <= result["top5"] <= 1 and result["loss"] > 0


def test_eval_on_a_separate_image_folder_maps_classes_by_name(tmp_path, capsys):
    train_dir = image_folder(tmp_path / "train", ["cat", "dog", "frog"], per_class=24)
    out = tmp_path / "run"
    code, _, _ = run(capsys, "train", "--model", "vit-n/2", *TINY, "--epochs", "6", "--lr", "3e-3", "--batch-size", "8", "--pool", "mean",
                     "--data", train_dir, "--out", out, "--val-fraction", "0.25")
    assert code == 0
    # the evaluation folder has only two of the classes, so its own label indices differ from training's
    test_dir = image_folder(tmp_path / "test", ["dog", "frog"], per_class=6, seed=1)
    (test_dir / "dog" / "0.png").rename(test_dir / "dog" / "0.PNG")
    code, stdout, _ = run(capsys, "eval", "--checkpoint", out / "checkpoint", "--data", test_dir, "--json")
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    # the oracle: the share of images whose most probable class, by name, is their folder's; a model that
    # tells the classes apart (above 1/2) would score below 1/2 if eval matched labels by index instead
    preds = pixformer.predict(out, test_dir)
    by_name = np.mean([r["predictions"][0]["class"] == Path(r["image"]).parent.name for r in preds])
    assert result["n"] == 12 and result["top1"] == pytest.approx(by_name) and by_name > 0.5
    code, stdout, _ = run(capsys, "eval", "--checkpoint", out, "--data", train_dir, "--split", "val")
    assert code == 0 and "n=18" in stdout
    code, _, err = run(capsys, "eval", "--checkpoint", out, "--data", image_folder(tmp_path / "x", ["bird"]))
    assert code == 2 and "classes ['bird'] of" in err and "not seen in training" in err


def test_models_lists_names_with_costs(capsys):
    code, out, _ = run(capsys, "models", "--img-size", "32")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["pit-t"][2] == "1024" and rows["vit-t/2"][2] == "256"
    assert "vit-b/16" in rows
    for option, value in (("--img-size", "0"), ("--num-classes", "-3"), ("--in-chans", "0")):   # not an empty table
        code, out, err = run(capsys, "models", option, value)
        assert code == 2 and not out and err.strip() == f"pixformer: error: {option} must be at least " \
            f"{'0 (0: no head)' if option == '--num-classes' else '1'}, got {value}", err


def test_a_run_out_of_memory_is_one_line_naming_what_fits_and_keeps_its_checkpoint(tmp_path, capsys, monkeypatch):
    """The allocator's failure (here a real one: a tensor no machine holds, asked in the second epoch's
    first step) ends the run in one line pointing at `pixformer plan`, its last checkpoint kept."""
    import torch

    from pixformer.models.vit import VisionTransformer
    out, forward = tmp_path / "run", VisionTransformer.forward

    def greedy(self, images):
        if self.training and (out / "checkpoint" / "state.json").exists():   # epoch 2's first step
            torch.empty(1 << 50, dtype=torch.uint8)
        return forward(self, images)
    monkeypatch.setattr(VisionTransformer, "forward", greedy)
    code, _, err = run(capsys, "train", "--model", "vit-n/4", *TINY, "--epochs", "2", "--train-subset", "64",
                       "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("pixformer: error: out of memory (1048576.00 GiB more could not be allocated): ")
    assert f"`pixformer plan --model vit-n/4 --batch-size 32` shows what fits" in err
    assert err.strip().endswith(f"the last checkpoint in {out} is kept (continue with --resume)")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] > 0


def test_an_image_size_no_memory_holds_is_refused_before_any_data(tmp_path, capsys, monkeypatch):
    from pixformer.engine import loop
    monkeypatch.setattr(loop, "load_source", lambda *a, **k: pytest.fail("loaded data"))
    code, _, err = run(capsys, "train", "--model", "vit-n/1", "--img-size", "4096", "--epochs", "1",
                       "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--img-size 4096: one image of vit-n/1 needs about" in err and "with every block checkpointed" in err
    assert not (tmp_path / "run").exists()


def test_demo_end_to_end_tiny(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--out", tmp_path / "demo", "--epochs", "1", "--train-subset", "64")
    assert code == 0 and f"run folder: {tmp_path / 'demo'}" in out
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["patch"] for r in rows] == [4, 2, 1] and [r["tokens"] for r in rows] == [4, 16, 64]
    for r in rows:
        assert set(r) >= {"patch", "tokens", "params", "gflops", "accuracy", "seconds"}
        assert 0 <= r["accuracy"] <= 1
    assert (tmp_path / "demo" / "accuracy_vs_patch.png").stat().st_size > 1000


def test_yaml_recipe_and_print_config(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: pit-n\nepochs: 7\nlr: 0.002\n")
    code, out, _ = run(capsys, "train", "--config", recipe, "--epochs", "3", "--print_config")
    assert code == 0 and "model: pit-n" in out and "epochs: 3" in out and "lr: 0.002" in out


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "vit-t/22x"], "unknown model name 'vit-t/22x'; did you mean"),
    (["train", "--model", "vit-n/3", "--img-size", "8"], "image size 8x8 is not divisible by patch size 3"),
    (["train", "--data", "/no/such/folder"], "dataset path /no/such/folder does not exist"),
    (["train", "--modle", "pit-t"], "unrecognized arguments: --modle pit-t (did you mean: --modle -> --model"),
    (["train", "--epochs", "many"], "--epochs: many is not a whole number"),
    (["train", "--img_size", "32.5"], "--img_size: 32.5 is not a whole number or null"),
    (["train", "--progressive", "[a]"], "--progressive: ['a'] is not a list of whole numbers or null"),
    (["train", "--rand-augment", "9"], "--rand-augment: 9 is not a list of 2 whole numbers or null"),
    (["train", "--betas", "3"], "--betas: 3 is not a list (a list is written [16, 32], quoted in a shell: '[16, 32]')"),
    (["train", "--betas", "[0.9]"], 'Parser key "betas": Expected a tuple with 2 elements'),   # as jsonargparse says
    (["train", "--model-args", "3"], "--model-args: 3 is not a mapping"),
    (["eval", "--checkpoint", "/no/run", "--split", "vall"], "--split: vall is not one of 'train', 'val', 'test'"),
    (["train", "--precision", "fp16"], "fp16 autocast is not used on CPU"),
    (["train", "--precision", "half"], "precision must be auto, fp32 or bf16"),
    (["eval", "--checkpoint", "/no/run", "--data", "digits"], "no checkpoint in /no/run"),
])
def test_bad_input_gives_one_clear_line(capsys, args, message):
    code, out, err = run(capsys, *args, *(TINY if args[0] == "train" else []))
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_image_size_the_patch_does_not_tile_is_refused_before_any_image_is_read(capsys, monkeypatch):
    import pixformer.engine.loop as loop
    monkeypatch.setattr(loop, "load_source", lambda *a, **k: pytest.fail("the data was read"))
    code, _, err = run(capsys, "train", "--task", "diffusion", "--model", "dit-n/4", "--img-size", "18", *TINY)
    assert code == 2 and err.strip() == "pixformer: error: image size 18x18 is not divisible by patch size 4"


def test_config_file_typo_is_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: pit-n\nepochz: 3\n")
    code, _, err = run(capsys, "train", "--config", recipe)
    assert code == 2 and "epochz" in err and len(err.strip().splitlines()) == 1


def test_corrupt_image_named_then_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIXFORMER_CACHE", str(tmp_path / "cache"))
    data = image_folder(tmp_path / "d", ["a", "b"])
    (data / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = run(capsys, "train", "--data", data, "--epochs", "1", "--out", tmp_path / "r", *TINY)
    assert code == 2 and "cannot read image" in err and "bad.png" in err
    code, _, err = run(capsys, "train", "--data", data, "--epochs", "1", "--out", tmp_path / "r2",
                       "--skip-bad-images", *TINY)
    assert code == 0 and "skipped 1 unreadable image(s)" in err          # said on stderr: stdout stays the result
    # eval reads the run's data as it trained (skipping, at the images' own size): the same decoded entry
    entries = sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*"))
    code, out, err = run(capsys, "eval", "--checkpoint", tmp_path / "r2", "--split", "val")
    assert code == 0 and "[val]" in out, err
    assert sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*")) == entries


def test_resume_with_another_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "train", "--model", "vit-n/4", *TINY, "--epochs", "1", "--train-subset", "64",
               "--out", out)[0] == 0
    code, _, err = run(capsys, "train", "--model", "vit-n/2", *TINY, "--epochs", "1", "--train-subset", "64",
                       "--out", out, "--resume")
    assert code == 2 and "other settings (model: vit-n/4 -> vit-n/2)" in err


def test_resume_of_a_folder_with_no_run_is_refused_unless_the_command_says_what_to_train(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--out", tmp_path / "typo", "--resume", "--epochs", "1")
    assert code == 2 and "holds no run to resume" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    assert run(capsys, "train", "--out", tmp_path / "empty", "--resume")[0] == 2
    code, out, _ = run(capsys, "train", "--model", "vit-n/4", *TINY, "--epochs", "1", "--train-subset", "64",
                       "--out", tmp_path / "empty", "--resume")     # as a torchrun restart before any checkpoint
    assert code == 0 and (tmp_path / "empty" / "checkpoint").is_dir()
    recipe = tmp_path / "overrides.yaml"                            # a recipe that names neither model nor data
    recipe.write_text("epochs: 1\ntrain_subset: 64\n")
    assert run(capsys, "train", "--config", recipe, *TINY, "--out", tmp_path / "new", "--resume")[0] == 0


def test_a_run_of_a_relative_data_path_resumes_from_any_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "d", ["a", "b"])
    args = ["--data", "d", "--img-size", "8", "--epochs", "1", "--out", tmp_path / "run", *TINY]
    assert run(capsys, "train", *args)[0] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "d")
    assert run(capsys, "train", *args, "--resume")[0] == 0                     # the same command, the same folder
    monkeypatch.chdir("/")
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--resume")
    assert code == 0, err


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_parses_and_names_a_known_model(capsys, recipe):
    from pixformer.models.registry import resolve
    code, out, err = run(capsys, "train", "--config", ROOT / "configs" / recipe, "--print_config")
    assert code == 0, err
    model = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("model:"))
    resolve(model)


def test_speed_flags_bare_and_valued(tmp_path, capsys):
    """A bare optional-bool flag means true (`--selective-checkpoint`), as for plain booleans; the
    speed settings a run resolved are in its state.json."""
    for flags, want in ((["--selective-checkpoint"], True), (["--selective-checkpoint", "false"], False), ([], False)):
        out = tmp_path / f"run{len(flags)}"
        code, _, err = run(capsys, "train", "--model", "pit-n", *TINY, "--epochs", "1", "--train-subset", "64",
                           "--out", out, "--allocator", "system", "--onednn-linear", "false", *flags)
        assert code == 0, err
        speed = json.loads((out / "checkpoint" / "state.json").read_text())["speed"]
        assert speed["selective_checkpoint"] is want and speed["onednn_linear"] is False
    code, _, err = run(capsys, "train", "--model", "pit-n", "--allocator", "fast", "--out", tmp_path / "bad")
    assert code != 0 and "allocator policy must be one of" in err


def test_eval_picks_exactly_one_split_and_never_scores_training_images_as_test(tmp_path, capsys):
    data = image_folder(tmp_path / "plain", ["cat", "dog"], per_class=10)
    out = tmp_path / "run"
    assert run(capsys, "train", "--model", "vit-n/4", *TINY, "--epochs", "1", "--batch-size", "4", "--data", data,
               "--val-fraction", "0.2", "--out", out)[0] == 0
    n = {}
    for split in ("train", "val"):
        code, stdout, err = run(capsys, "eval", "--checkpoint", out, "--split", split, "--json")
        assert code == 0, err
        n[split] = json.loads(stdout.strip().splitlines()[-1])["n"]
    assert n == {"train": 16, "val": 4}
    code, _, err = run(capsys, "eval", "--checkpoint", out, "--data", data)          # --split test (the default)
    assert code == 2 and "has no test split, and the run trained on the rest of it: use --split val" in err
    other = image_folder(tmp_path / "other", ["dog"], per_class=3, seed=2)            # a folder of test images
    code, stdout, _ = run(capsys, "eval", "--checkpoint", out, "--data", other, "--json")
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["n"] == 3
    code, _, err = run(capsys, "eval", "--checkpoint", out, "--data", other, "--split", "val")
    assert code == 2 and "all its images are test images" in err


def test_model_and_task_settings_as_mappings_or_shortcuts(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "vit-n/4", "--model-args", "{depth: 3, dim: 16, heads: 2}",
                       "--depth", "1", "--task-args", "{label_smoothing: 0.2}", "--mixup", "0.1", "--epochs", "1",
                       "--train-subset", "64", "--batch-size", "32", "--progress", "false", "--out", out)
    assert code == 0, err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["model"]["config"]["depth"] == 1 and state["model"]["config"]["dim"] == 16   # the shortcut wins
    assert state["task"]["config"] == {"label_smoothing": 0.2, "mixup": 0.1, "cutmix": 0.0, "eval_flip": False}
    code, _, err = run(capsys, "train", "--model", "convmixer-16/1", "--pos-embed", "none", "--out", tmp_path / "x")
    assert code == 2 and "convmixer-16/1 (convmixer) has no setting(s) ['pos_embed']" in err
    code, _, err = run(capsys, "train", "--task", "segment", "--out", tmp_path / "y")
    assert code == 2 and "unknown task 'segment'" in err
    code, stdout, _ = run(capsys, "train", "--help")
    assert code == 0 and "--depth" in stdout and "--mixup" in stdout and "--attn_backend" in stdout.replace("speed.", "")


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "pixformer", "models", "--img-size", "8"], capture_output=True, text=True)
    assert done.returncode == 0 and "pit-n" in done.stdout


def test_eval_starts_without_importing_fsdp(tmp_path, capsys):
    """FSDP2, its checkpoint API and DTensor take about a second to import: a command that shards nothing
    (here eval) never imports them. (Building any torch optimizer imports dynamo, and with it DTensor.)"""
    import subprocess
    import sys
    out = tmp_path / "run"
    assert run(capsys, "train", "--model", "vit-n/4", *TINY, "--epochs", "1", "--train-subset", "64",
               "--out", out)[0] == 0
    code = ("import sys; from pixformer.cli import main; code = main(['eval', '--checkpoint', sys.argv[1]]); "
            "print(code, sorted(m for m in sys.modules if m.startswith(('torch.distributed.tensor', "
            "'torch.distributed.fsdp', 'torch.distributed.checkpoint'))))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and " top1 " in done.stdout, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "0 []"


def test_eval_reads_a_checkpoint_written_before_tasks_existed(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "train", "--model", "vit-n/4", *TINY, "--epochs", "1", "--train-subset", "64",
               "--out", out)[0] == 0
    path = out / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    del state["task"], state["data"]["source"]                     # as pixformer 0.1 wrote them
    path.write_text(json.dumps(state))
    code, stdout, err = run(capsys, "eval", "--checkpoint", out, "--json")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["n"] == 359


def test_speed_shortcuts_only_where_the_speed_group_is(capsys):
    code, stdout, err = run(capsys, "plan", "--model", "pit-n", "--img-size", "8", "--attn-backend", "math",
                            "--batch-size", "2", "--json")
    assert code == 0, err
    assert json.loads(stdout)["attn"] == "math"


def test_plan_per_rank_with_sequence_and_data_parallel(capsys):
    code, stdout, err = run(capsys, "plan", "--model", "pit-t", "--img-size", "64", "--memory", "4GiB",
                            "--precision", "fp32", "--seq-parallel", "4", "--data-parallel", "2")
    assert code == 0, err
    assert "per rank of 8 (sequence parallel 4 x data parallel 2): 1,025 tokens of each image" in stdout
    assert "key value gathers" in stdout and "longest square side whose step fits 4.00 GiB a rank" in stdout
    assert "sequence parallel P=4: keys/values kept in " in stdout           # --seq-regather auto
    code, stdout, err = run(capsys, "plan", "--model", "pit-t", "--img-size", "64", "--seq-parallel", "4",
                            "--seq-regather", "all")
    assert code == 0, err
    assert "sequence parallel P=4: keys/values gathered again in all 12 layers (activations ~" in stdout
    code, stdout, err = run(capsys, "plan", "--model", "pit-t", "--img-size", "64", "--seq-parallel", "4", "--json")
    assert code == 0, err
    assert json.loads(stdout)["comm"]["key_value_gathers"] > 0
    code, _, err = run(capsys, "plan", "--model", "pit-n", "--img-size", "2", "--seq-parallel", "8")
    assert code == 2 and err.strip() == "pixformer: error: 4 tokens cannot be split over 8 sequence-parallel ranks"


def test_the_muon_two_hour_recipe_is_the_two_hour_recipe_with_the_options_it_was_measured_with():
    """configs/cifar10-convmixer-muon-2h.yaml is the run docs/results.md reports: the AdamW two-hour
    recipe with the options its command gave, setting for setting."""
    from pixformer.cli import build_parser
    from pixformer.engine.config import config_from_options

    def config(*args):
        return config_from_options(build_parser().parse_args(["train", *args]).train.as_dict())
    measured = config("--config", str(ROOT / "configs" / "cifar10-convmixer-2h.yaml"), "--epochs", "22",
                      "--optimizer", "muon", "--lr", "0.02", "--progressive", "[24,32]", "--warmup_epochs", "8",
                      "--accum_steps", "4")   # (the parser's own spelling: main() also takes dashes)
    assert config("--config", str(ROOT / "configs" / "cifar10-convmixer-muon-2h.yaml")) == measured
