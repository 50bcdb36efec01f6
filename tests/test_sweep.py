import csv
import dataclasses
import json
import os
import signal

import pytest

import pixformer.experiments.sweep as sweep_mod
import pixformer.engine.loop as train_mod
from pixformer import PixformerError
from pixformer.cli import main
from pixformer.engine import TrainConfig
from pixformer.experiments.sweep import SweepConfig, plan, point_geometry, run_sweep, sweep_config

TINY = TrainConfig(data="digits", model_args=dict(depth=1, dim=16, heads=2), epochs=2, batch_size=32, train_subset=64,
                   progress=False)


def test_fixed_input_grid():
    cfg = SweepConfig(regime="fixed-input", patches=[8, 4, 2, 1], size="t")
    points = plan(cfg, native=(32, 32), in_chans=3, num_classes=10)
    assert [(p.patch, p.img, p.tokens) for p in points] == \
        [(8, (32, 32), 16), (4, (32, 32), 64), (2, (32, 32), 256), (1, (32, 32), 1024)]
    assert [p.model for p in points] == ["vit-t/8", "vit-t/4", "vit-t/2", "pit-t"]
    assert all(p.resize is None for p in points)  # the data as it is
    # patch 8 -> 4: the patch embedding loses 3*(64-16) inputs, the position table gains 64-16 rows (width 192)
    assert points[0].params - points[1].params == (3 * 48 - 48) * 192 and points[-1].flops > points[0].flops
    points = plan(dataclasses.replace(cfg, img_size=16, patches=[4, 2]), (32, 32), 3, 10)
    assert [(p.img, p.resize, p.tokens) for p in points] == [((16, 16), 16, 16), ((16, 16), 16, 64)]


def test_fixed_tokens_grid():
    cfg = SweepConfig(regime="fixed-tokens", patches=[4, 2, 1])
    points = plan(cfg, native=(32, 32), in_chans=3, num_classes=10)
    assert [(p.patch, p.img, p.tokens, p.resize) for p in points] == \
        [(4, (32, 32), 64, None), (2, (16, 16), 64, 16), (1, (8, 8), 64, 8)]
    assert point_geometry(dataclasses.replace(cfg, tokens=16), (32, 32)) == [(4, (16, 16)), (2, (8, 8)), (1, (4, 4))]


def test_any_named_model_sweeps_its_patch_size():
    cfg = SweepConfig(patches=[2, 1], model="convmixer-256/8", train=TrainConfig(model_args=dict(dim=16, depth=1)))
    points = plan(cfg, (8, 8), 1, 10)
    assert [p.model for p in points] == ["convmixer-256/8"] * 2
    run = sweep_mod.point_config(cfg, points[1], 3, sweep_mod.Path("out"))
    assert (run.model_args, run.seed, run.resume) == ({"dim": 16, "depth": 1, "patch_size": 1}, 3, True)


@pytest.mark.parametrize("settings,match", [
    (dict(patches=[4, 3]), "patch 3 at input 8x8"),
    (dict(regime="fixed-tokens", tokens=50), "50 tokens"),
    (dict(regime="fixed-tokens", patches=[3, 2]), "give --tokens"),
    (dict(regime="sideways"), "regime"),
    (dict(tokens=64), "fixed-tokens"),
    (dict(patches=[]), "patches"),
    (dict(size="x"), "size"),
    (dict(seeds=[]), "seeds"),
    (dict(model="convmixer-64/2", train=TrainConfig(model_args=dict(pos_embed="none"))), "p4-8x8 \\(convmixer-64/2\\).*pos_embed"),
    (dict(train=TrainConfig(model_args=dict(heads=5))), "p4-8x8.*divisible by 5 heads"),
])
def test_bad_settings_are_rejected_naming_the_point(settings, match):
    with pytest.raises(PixformerError, match=match):
        plan(SweepConfig(**{"patches": [4, 2], **settings}), (8, 8), 1, 10)


def test_nothing_trains_when_a_point_is_invalid(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "train", lambda *a, **k: pytest.fail("trained before checking every point"))
    with pytest.raises(PixformerError, match="patch 3"):
        run_sweep(SweepConfig(patches=[4, 2, 3], out=str(tmp_path / "s"), train=TINY))
    assert not (tmp_path / "s").exists()


def test_cli_rejects_bad_sweep_settings(tmp_path, capsys):
    assert main(["sweep", "--regime", "fixed-tokens", "--tokens", "12", "--out", str(tmp_path / "s")]) == 2
    assert "12 tokens" in capsys.readouterr().err
    cfg = sweep_config({"regime": "fixed-tokens", "img_size": 16, "epochs": 3, "out": "x"})
    assert (cfg.img_size, cfg.out, cfg.train.epochs, cfg.train.img_size, cfg.train.out) == (16, "x", 3, None, None)


def test_two_point_sweep_caches_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    cfg = SweepConfig(patches=[4, 2], seeds=[0], out=str(out), train=TINY)
    calls = []
    real_train = sweep_mod.train
    monkeypatch.setattr(sweep_mod, "train", lambda c, d: calls.append(c.out) or real_train(c, d))

    # first run: stop the second point during its second epoch (step 3 of 4), as Ctrl-C would
    real_lr_at = train_mod.lr_at

    def interrupt(step, *args):
        if step == 2 and calls[-1].endswith("p2-8x8/seed0"):
            os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C: the step finishes, then the run stops
        return real_lr_at(step, *args)
    monkeypatch.setattr(train_mod, "lr_at", interrupt)
    with pytest.raises(PixformerError, match="sweep stopped at p2-8x8 seed 0.*--out"):
        run_sweep(cfg)
    first = json.loads((out / "p4-8x8/seed0/result.json").read_text())
    assert not (out / "p2-8x8/seed0/result.json").exists()
    assert json.loads((out / "p2-8x8/seed0/checkpoint/state.json").read_text())["step"] == 3

    # second run: the finished point is read back, the interrupted one resumes from step 3
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    calls.clear()
    _, rows = run_sweep(cfg)
    assert calls == [str(out / "p2-8x8" / "seed0")]
    resumed = json.loads((out / "p2-8x8/seed0/result.json").read_text())
    assert resumed["resumed"] is True and resumed["step"] == 4
    assert [r["patch"] for r in rows] == [4, 2] and rows[0]["accuracy"] == first["top1"]
    # ... to the same result as an uninterrupted run
    fresh = real_train(dataclasses.replace(sweep_mod.point_config(cfg, sweep_mod.plan(cfg, (8, 8), 1, 10)[1], 0, out),
                                           out=str(tmp_path / "fresh"), resume=False), None)
    assert fresh["test_top1"] == resumed["top1"]

    # third run: nothing trains; outputs are written
    calls.clear()
    _, again = run_sweep(cfg)
    assert calls == [] and [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["patch"], r["tokens"], r["input"]) for r in table] == [("4", "4", "8x8"), ("2", "16", "8x8")]
    assert "± " not in (out / "results.md").read_text() and (out / "accuracy_vs_patch_fixed-input.png").exists()

    # a changed recipe in the same folder is refused before anything trains
    with pytest.raises(PixformerError, match="epochs: 2 -> 3"):
        run_sweep(dataclasses.replace(cfg, train=dataclasses.replace(TINY, epochs=3)))
    assert calls == []


def test_seeds_give_mean_and_std_through_the_cli(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--regime", "fixed-tokens", "--patches", "[2,1]", "--tokens", "16", "--seeds", "[0,1]",
                 "--depth", "1", "--dim", "16", "--heads", "2", "--epochs", "1", "--train-subset", "64",
                 "--batch-size", "32", "--progress", "false", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "8x8" in printed and "4x4" in printed and " ± " in printed
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["input"], r["tokens"], r["seeds"]) for r in table] == [("8x8", "16", "2"), ("4x4", "16", "2")]
    assert (out / "accuracy_vs_patch_fixed-tokens.png").exists()
    assert f"plot:    {out / 'accuracy_vs_patch_fixed-tokens.png'}" in printed      # every file it wrote, named


@pytest.mark.parametrize("args, message", [
    (["--regime", "sideways"], "regime must be one of"),
    (["--patches", "[4, 4]"], "patches must be distinct sizes >= 1"),
    (["--seeds", "[]"], "seeds must be a non-empty list"),
    (["--size", "x"], "size must be one of"),
])
def test_settings_that_need_no_data_are_refused_before_any_is_read(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_mod, "prepare_data", lambda *a, **k: pytest.fail("data read for a bad setting"))
    assert main(["sweep", *args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()
