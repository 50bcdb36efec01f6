"""The command line for someone new to it: help that explains every option, one line for every bad
setting (before any work), typo hints from the same command, the stop message's command that
continues a run as printed, Ctrl-C / SIGTERM exits, --init building the run's architecture, and a
run's printed model name as --model."""
import dataclasses
import json
import os
import shlex
import signal
import time

import pytest

import pixformer.engine.loop as loop
from pixformer.cli import build_parser, main

TINY = ["--depth", "1", "--dim", "16", "--heads", "2", "--batch-size", "32", "--train-subset", "192",
        "--epochs", "2", "--progress", "false", "--precision", "fp32"]      # 6 steps an epoch


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---- every bad setting: one line, exit 2, before any work ------------------------------------------
BAD = {
    "lr": (["train", "--lr", "-1"], "--lr must be > 0"),
    "betas": (["train", "--betas", "[2,3]"], "--betas must be two numbers, each in [0, 1)"),
    "img-size negative": (["train", "--img-size", "-8"], "--img-size must be at least 1"),
    "img-size 0": (["train", "--img-size", "0"], "--img-size must be at least 1"),
    "img-size huge": (["train", "--img-size", "100000"], "--img-size 100000 is too large: one 100000x100000 RGB "
                      "image takes 27.9 GiB decoded; at most 8192"),
    "eval-batch-size": (["train", "--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    "epochs 0": (["train", "--epochs", "0"], "--epochs must be at least 1"),
    "epochs -1": (["train", "--epochs", "-1"], "--epochs must be at least 1"),
    "depth": (["train", "--depth", "-1"], "--depth must be at least 0"),
    "train-subset -5": (["train", "--train-subset", "-5"], "--train-subset must be at least 1"),
    "train-subset 0": (["train", "--train-subset", "0"], "--train-subset must be at least 1"),
    "ema-decay": (["train", "--ema-decay", "2"], "--ema-decay must be in [0, 1)"),
    "warmup-epochs": (["train", "--warmup-epochs", "-1"], "--warmup-epochs must be at least 0"),
    "checkpoint-every": (["train", "--checkpoint-every", "-1"], "--checkpoint-every must be at least 0"),
    "crop-padding": (["train", "--crop-padding", "-1"], "--crop-padding must be at least 0"),
    "batch-size": (["train", "--batch-size", "0"], "--batch-size must be at least 1"),
    "heads": (["train", "--heads", "0"], "--heads must be at least 1"),
    "decoder-dim": (["train", "--task", "mae", "--decoder-dim", "0"], "--decoder-dim must be at least 1"),
    "yaml nan": ("lr: .nan\n", "--lr must be a finite number, got nan"),
    "yaml model_args type": ('model_args: {depth: "x"}\n', "--depth must be an integer, got 'x'"),
    "yaml speed": ("speed: 7\n", "speed"),
    "yaml speed key": ("speed: {compiled: true}\n", "does not accept option 'speed.compiled'"),
    "eval batch": (["eval", "--checkpoint", "RUN", "--batch-size", "0"], "--batch-size must be at least 1"),
    "sample batch": (["sample", "--checkpoint", "RUN", "--batch-size", "0"], "--batch-size must be at least 1"),
    "fid batch": (["fid", "--checkpoint", "RUN", "--batch-size", "0"], "--batch-size must be at least 1"),
    "sample classes abc": (["sample", "--checkpoint", "RUN", "--classes", "abc"], "--classes takes class indices"),
    "sample classes 1.5": (["sample", "--checkpoint", "RUN", "--classes", "1.5"], "--classes takes class indices"),
    "sample steps": (["sample", "--checkpoint", "RUN", "--steps", "0"], "--steps must be at least 1"),
    "packing without a budget": (["train", "--pack-length", "256", "--token-drop", "0.1"],
                                 "--pack-length, --token-drop set how images are packed at native resolution, which "
                                 "is on with a budget: add --max-side or --max-tokens"),
    "two token drops": (["train", "--max-side", "32", "--token-drop", "0.1", "--token-drop-beta", "[2, 5]"],
                        "--token-drop (one rate) and --token-drop-beta (a rate drawn per image) are two ways"),
    "permute and swaps": (["train", "--permute-pixels", "true", "--local-swaps", "4"],
                          "choose one of --permute-pixels and --local-swaps"),
    "swap distance alone": (["train", "--swap-distance", "2"], "--swap-distance 2 bounds the swaps of --local-swaps"),
    "checkpoint blocks word": (["train", "--checkpoint-blocks", "foo"],
                               "checkpoint blocks must be 'all' or a number of blocks >= 0, got 'foo'"),
    "checkpoint blocks -1": (["train", "--checkpoint-blocks", "-1"], "a number of blocks >= 0, got -1"),
    "demo epochs 0": (["demo", "--out", "RUN", "--epochs", "0"], "--epochs must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_setting_is_one_line_before_any_work(case, tmp_path, capsys, monkeypatch):
    args, message = BAD[case]
    monkeypatch.setattr(loop, "prepare_data", lambda *a, **k: pytest.fail("data loaded for a bad setting"))
    if isinstance(args, str):                                   # a YAML recipe
        (tmp_path / "r.yaml").write_text(args)
        args = ["train", "--config", tmp_path / "r.yaml"]
    args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    if args[0] == "train":
        args += ["--out", tmp_path / "run"]
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert message in err and err.startswith("pixformer: error: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()                      # nothing made


# ---- help ------------------------------------------------------------------------------------------
def subcommands():
    return build_parser()._subcommands_action.choices


def test_version_is_one_line(capsys):
    from pixformer import __version__
    for flag in ("--version", "-V"):
        code, out, _ = run(capsys, flag)
        assert code == 0 and out.strip() == f"pixformer {__version__}"


def test_ctrl_c_while_starting_up_is_one_line(capsys, monkeypatch):
    import pixformer.cli as cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)            # as if Ctrl-C fell while torch imported
    code, _, err = run(capsys, "train", "--model", "pit-n")
    assert code == 130 and err == "pixformer: interrupted\n"



def test_sigterm_while_starting_up_is_one_line(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM before the training loop (which stops at a safe step) ends the command with one
    line and the shell's code for it, not a silent death; the handler is put back after."""
    def terminated(*a, **k):                                         # as if it fell while the data decoded
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")
    monkeypatch.setattr(loop, "prepare_data", terminated)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run(capsys, "train", "--model", "pit-n", "--out", tmp_path / "r")
    assert code == 143 and err == ("pixformer: stopped (SIGTERM) outside a training step; any checkpoint already "
                                   "written is kept\n")
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_option_of_every_command_has_a_description():
    missing = [f"{name} {a.option_strings[0]}" for name, sub in subcommands().items() for a in sub._actions
               if a.option_strings and not (a.help or "").strip()]
    assert not missing, missing


def test_the_top_help_lists_every_command_with_its_line(capsys):
    from pixformer.cli import PARSERS
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "(required)" not in out
    flat = " ".join(out.split())                                     # the lines as argparse wraps them, joined
    for name, _, line in PARSERS:
        assert f" {name} {line}" in flat, name


def test_train_help_lists_choices_in_groups_without_a_raw_signature(capsys):
    from pixformer.models.attention import available_backends
    from pixformer.tasks import TASKS
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "TrainConfig(" not in out
    for group in ("model:", "task:", "data:", "optimisation:", "run:", "speed and memory:", "parallelism:"):
        assert f"\n{group}\n" in out, group
    helps = {o: a.help for a in subcommands()["train"]._actions for o in a.option_strings}
    wanted = {"--task": list(TASKS), "--precision": ["auto", "fp32", "bf16"], "--pool": ["cls", "mean"],
              "--pos_embed": ["learned", "factorized", "sincos2d", "none"],
              "--speed.attn_backend": available_backends(), "--seq_sharding": ["contiguous", "strided", "random"],
              "--speed.allocator": ["auto", "keep", "release", "system"], "--device": ["auto", "cpu", "cuda"]}
    for option, values in wanted.items():
        assert all(v in helps[option] for v in values), (option, helps[option])
    # a setting several tasks (or models) share: each owner's comment where they differ, else one, owners named
    assert helps["--samples"].startswith("mae: validation images in each epoch's reconstructions PNG; diffusion: "
                                         "images in each epoch's grid")
    assert "[mae, diffusion]" not in helps["--samples"] and helps["--mixup"].endswith("0 = off [classify, probe]")


def test_field_comments_are_the_help_and_headings_the_groups():
    from pixformer.engine.config import TrainConfig
    from pixformer.settings import field_docs
    docs = field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(d.help and d.section for d in docs.values()), [n for n, d in docs.items() if not d.help]
    assert docs["layer_decay"].help.startswith("layer-wise lr decay") and "decay^(L + 1)" in docs["layer_decay"].help
    assert docs["lr"].section.startswith("optimisation")


def test_typo_hints_come_from_the_same_command_and_never_name_the_typo(capsys):
    code, _, err = run(capsys, "plan", "--model", "pit-n", "--eta", "1")
    assert code == 2 and "unrecognized arguments: --eta 1" in err and "did you mean" not in err
    code, _, err = run(capsys, "train", "--img-siz", "8")
    assert code == 2 and "--img-siz -> --img-size" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "train", "--attn_backnd", "math")
    assert code == 2 and "--attn_backnd -> --attn_backend" in err
    code, _, err = run(capsys, "trian", "--epochs", "1")
    assert code == 2 and "unknown command 'trian'; did you mean `pixformer train`?" in err
    assert "train, eval, sample" in err and "pixformer trian --help" not in err
    code, _, err = run(capsys, "train", "--epoch", "1")             # the nearest alone, not --depth too
    assert code == 2 and "(did you mean: --epoch -> --epochs?)" in err, err


def test_a_missing_option_is_named_as_the_command_line_spells_it(capsys):
    code, _, err = run(capsys, "predict", "x.png")
    assert code == 2 and "pixformer: error: --checkpoint is required" in err and "predict." not in err, err
    code, _, err = run(capsys, "export", "--checkpoint", "x")
    assert code == 2 and "--format and --out are required" in err, err
    code, _, err = run(capsys, "predict")                              # a positional as the usage line names it
    assert code == 2 and "--checkpoint and PATHS are required" in err and "usage: pixformer predict" not in err, err


# ---- stopping and resuming as printed -------------------------------------------------------------
def stop_at(monkeypatch, step: int, signum=signal.SIGTERM):
    real = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda s, *a: (os.kill(os.getpid(), signum) if s == step else None)
                        or real(s, *a))


def test_a_stopped_run_continues_with_the_printed_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / "my run"                                           # a space: the command quotes it
    stop_at(monkeypatch, 5)
    code, _, err = run(capsys, "train", "--model", "vit-n/4", *TINY, "--lr", "2e-3", "--out", out)
    assert code == 143 and err.startswith("pixformer: stopped (SIGTERM) at step 6/12") and "error" not in err
    printed = err.split("Continue with: ", 1)[1].strip()
    assert printed == f"pixformer train --out '{out}' --resume"
    monkeypatch.undo()
    code, _, err = run(capsys, *shlex.split(printed)[1:], "--lr", "0.5")           # a setting of its own: named
    assert code == 2 and "other settings (lr: 0.002 -> 0.5)" in err
    code, stdout, err = run(capsys, *shlex.split(printed)[1:], "--eval-batch-size", "64")   # how it runs: may change
    assert code == 0, err
    assert "resuming" in stdout and '"step": 12' in stdout
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["train_config"]["lr"] == 2e-3 and state["model"]["config"]["dim"] == 16
    from pixformer.engine.config import TrainConfig
    assert TrainConfig.from_run(str(out)).lr == 2e-3


def test_ctrl_c_exits_130_without_error(tmp_path, capsys, monkeypatch):
    stop_at(monkeypatch, 2, signal.SIGINT)
    code, _, err = run(capsys, "train", "--model", "vit-n/4", *TINY, "--out", tmp_path / "a")
    assert code == 130 and err.startswith("pixformer: stopped (SIGINT) at step 3/12; checkpoint saved")
    assert "error" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(loop, "lr_at", lambda s, *a: (_ for _ in ()).throw(KeyboardInterrupt) if s == 1 else 1e-3)
    code, _, err = run(capsys, "train", "--model", "vit-n/4", *TINY, "--out", tmp_path / "b")
    assert code == 130 and err.startswith("pixformer: stopped at once (a second Ctrl-C) at step 1/12; no checkpoint")
    assert f"Continue with: pixformer train --out {tmp_path / 'b'} --resume" in err and "error" not in err


# ---- --init builds the run's architecture; a run's name is a model name ----------------------------
def test_probe_of_an_mae_run_needs_no_sizes_repeated(tmp_path, capsys):
    mae = tmp_path / "mae"
    code, _, err = run(capsys, "train", "--task", "mae", "--model", "pit-n", "--depth", "1", "--dim", "32",
                       "--heads", "2", "--epochs", "1", "--train-subset", "64", "--batch-size", "32",
                       "--progress", "false", "--out", mae)
    assert code == 0, err
    code, stdout, err = run(capsys, "train", "--task", "probe", "--init", mae, "--epochs", "1", "--train-subset", "64",
                            "--batch-size", "32", "--progress", "false", "--out", tmp_path / "probe")
    assert code == 0, err
    assert '--model pit-n --model-args {"depth": 1, "dim": 32, "heads": 2}' in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["model_name"] == "probe-pit-d1w32h2"


def test_a_runs_printed_name_is_a_model_name(capsys):
    from pixformer.models.registry import architecture, create_model, model_name, resolve
    assert resolve("vit-d2w32/8") == ("vit", {"depth": 2, "dim": 32, "heads": 1, "patch_size": 8})
    assert resolve("pit-d4w192") == ("vit", {"depth": 4, "dim": 192, "heads": 3, "patch_size": 1})
    assert resolve("dit-d1w16/2")[1]["depth"] == 1
    for name in ("pit-d4w64", "vit-d2w32/8", "dit-d1w16/2", "vit-t/4", "vit-d4w128h4/2", "dit-d2w64h4/2"):
        assert model_name(create_model(name, img_size=8)) == name
    for name, sizes in (("vit-n/2", dict(depth=4)), ("vit-t/4", dict(dim=96, heads=3)), ("dit-s/2", dict(heads=3))):
        built = create_model(name, img_size=8, **sizes)             # the printed name builds the same sizes again
        again = create_model(model_name(built), img_size=8)
        assert (again.cfg.depth, again.cfg.dim, again.cfg.heads) == (built.cfg.depth, built.cfg.dim, built.cfg.heads)
    model = create_model("vit-n/4", img_size=8, depth=1, dim=16, heads=2, pool="mean")
    spec = {"arch": "vit", "config": json.loads(json.dumps(dataclasses.asdict(model.cfg)))}
    assert architecture(spec, "vit-n/4") == ("vit-n/4", {"depth": 1, "dim": 16, "heads": 2, "pool": "mean"})
    assert architecture({"arch": "mae", "config": {"encoder": spec["config"]}}) == \
        ("vit-n/4", {"depth": 1, "dim": 16, "heads": 2, "pool": "mean"})
    code, out, err = run(capsys, "plan", "--model", "pit-d4w64", "--img-size", "8", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 64, err


def test_sweep_rows_are_labelled_with_the_model_built():
    from pixformer.engine import TrainConfig
    from pixformer.experiments.sweep import SweepConfig, plan
    points = plan(SweepConfig(patches=[4, 1], train=TrainConfig(model_args=dict(depth=2, dim=32, heads=2))), (8, 8), 1, 10)
    assert [(p.model, p.built) for p in points] == [("vit-n/4", "vit-d2w32h2/4"), ("pit-n", "pit-d2w32h2")]


def test_mae_of_a_printed_size_takes_the_decoder_of_the_listed_size_nearest_in_width():
    from pixformer.tasks import MAE, DataFacts, MAETaskConfig
    facts = DataFacts(["a", "b"], 1, (8, 8), [0.5], [0.25])
    model = MAE(MAETaskConfig(), facts).build_model("pit-d1w32", {})
    assert model.encoder.cfg.dim == 32 and model.cfg.decoder_dim == 64           # vit-n's decoder (width 128)
    assert MAE(MAETaskConfig(), facts).build_model("vit-t/4", {}).cfg.decoder_dim == 128
