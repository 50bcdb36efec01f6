"""Evaluation settings: validating every N epochs (--eval-every) and the mirrored test-time
augmentation of a classifier (--eval-flip, and `pixformer eval --eval_flip`)."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixformer import PixformerError, TrainConfig, train
from pixformer.cli import main
from pixformer.tasks.base import DataFacts
from pixformer.tasks.classify import Classify, ClassifyConfig

TINY = dict(model="vit-n/2", data="digits", model_args=dict(depth=1, dim=16, heads=2), batch_size=32,
            train_subset=192, epochs=3, progress=False, precision="fp32", lr=3e-3)   # 6 steps an epoch


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3, 3))                  # images (B, 1, 2, 3), 3 classes
    images = torch.randn(5, 1, 2, 3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    facts = DataFacts(["a", "b", "c"], 1, (2, 3), [0.0], [1.0])
    plain = Classify(ClassifyConfig(), facts).eval_sums(model, images, labels, None)
    flipped = Classify(ClassifyConfig(eval_flip=True), facts).eval_sums(model, images, labels, None)
    with torch.no_grad():
        mirror = images[..., [2, 1, 0]]                                        # each row read right to left
        expected = (model(images) + model(mirror)) / 2
        expected_plain = model(images)
    assert flipped["loss"] == pytest.approx(F.cross_entropy(expected, labels, reduction="sum").item(), rel=1e-6)
    assert flipped["top1"] == (expected.argmax(1) == labels).sum().item()
    assert plain["loss"] == pytest.approx(F.cross_entropy(expected_plain, labels, reduction="sum").item(), rel=1e-6)
    assert flipped["loss"] != pytest.approx(plain["loss"])                   # the mirror changed something
    symmetric = torch.cat([images, images.flip(-1)], 0)[:, :, :, [0, 1, 0]]   # rows that read the same both ways
    a = Classify(ClassifyConfig(eval_flip=True), facts).eval_sums(model, symmetric, labels.repeat(2), None)
    b = Classify(ClassifyConfig(), facts).eval_sums(model, symmetric, labels.repeat(2), None)
    assert a == pytest.approx(b)


def test_eval_every_validates_every_nth_epoch_and_the_last(tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig(**TINY, eval_every=2, out=str(out)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "epoch" in r and "test_top1" not in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert ["val_top1" in r for r in epochs] == [False, True, True]          # epoch 2 (the 2nd), epoch 3 (the last)
    assert "train_loss" in epochs[0] and result["val_top1"] == epochs[-1]["val_top1"]
    out0 = tmp_path / "run0"
    train(TrainConfig(**TINY, eval_every=0, out=str(out0)))
    rows = [json.loads(line) for line in (out0 / "metrics.jsonl").read_text().splitlines()]
    assert ["val_top1" in r for r in rows if "epoch" in r and "test_top1" not in r] == [False, False, True]


@pytest.mark.parametrize("settings", [dict(eval_every=2), dict(eval_every=0, task_args=dict(eval_flip=True))],
                         ids=["every-2", "flip-at-the-end"])
def test_a_run_that_validates_less_often_resumes_exactly(settings, tmp_path, resumes_exactly):
    run = {**TINY, **settings}
    resumes_exactly(run, train(TrainConfig(**run, out=str(tmp_path / "full"))))


def test_bad_evaluation_settings_are_one_line_before_any_work(tmp_path):
    with pytest.raises(PixformerError, match=r"--eval-every must be >= 0 \(epochs between validations\), got -1"):
        TrainConfig(**TINY, eval_every=-1)
    with pytest.raises(PixformerError, match="--eval-flip mirrors square evaluation batches"):
        train(TrainConfig(**{**TINY, "max_side": 8, "task_args": dict(eval_flip=True)}, out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_flip_overrides_the_runs_setting_and_refuses_what_it_cannot_mirror(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--model", "vit-n/2", "--depth", "1", "--dim", "16", "--heads", "2",
                         "--batch-size", "32", "--train-subset", "192", "--epochs", "1", "--progress", "false",
                         "--eval-flip", "true", "--out", out)
    assert code == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["task"]["config"]["eval_flip"] is True                      # saved with the run
    results = {}
    for flip in ("true", "false"):
        code, stdout, _ = run_cli(capsys, "eval", "--checkpoint", out, "--split", "val", "--eval_flip", flip, "--json")
        assert code == 0
        results[flip] = json.loads(stdout.strip().splitlines()[-1])
    code, stdout, _ = run_cli(capsys, "eval", "--checkpoint", out, "--split", "val", "--json")   # the run's own: flip
    assert json.loads(stdout.strip().splitlines()[-1]) == results["true"]
    assert results["true"]["n"] == results["false"]["n"] and results["true"]["loss"] != results["false"]["loss"]
    mae = tmp_path / "mae"
    code, _, _ = run_cli(capsys, "train", "--task", "mae", "--model", "vit-n/2", "--depth", "1", "--dim", "16",
                         "--heads", "2", "--decoder-depth", "1", "--decoder-dim", "16", "--decoder-heads", "2",
                         "--batch-size", "32", "--train-subset", "64", "--epochs", "1", "--progress", "false",
                         "--out", mae)
    assert code == 0
    code, _, err = run_cli(capsys, "eval", "--checkpoint", mae, "--eval_flip", "true")
    assert code != 0 and "--eval_flip averages a classifier's logits; this run's task is mae" in err
    assert len(err.strip().splitlines()) == 1


def test_a_process_with_no_share_of_a_batch_sums_the_same_keys_as_the_others(monkeypatch):
    """Batches smaller than the processes leave some with no image: those score one uncounted image, so
    every process all-reduces the same keys (an empty dict against the others' would break the collective)."""
    from pixformer.data.store import ImageSet
    from pixformer.engine.loop import evaluate
    from pixformer.engine.runtime import Runtime
    facts = DataFacts(["a", "b", "c"], 1, (2, 3), [0.0], [1.0])
    task = Classify(ClassifyConfig(), facts)
    data = ImageSet(torch.randint(0, 256, (3, 1, 2, 3), dtype=torch.uint8), torch.tensor([0, 1, 2]), facts.classes)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3, 3))
    reduced = {}
    for rank in (0, 1):                           # batches of one image: rank 1's share of each is empty
        monkeypatch.setattr(Runtime, "all_reduce", lambda self, sums: reduced.setdefault(self.rank, dict(sums)))
        evaluate(task, model, data, 1, Runtime(torch.device("cpu"), rank=rank, world_size=2), desc=None)
    assert list(reduced[0]) == list(reduced[1]) and reduced[0]["n"] == 3 and reduced[1]["n"] == 0
    assert all(v == 0 for v in reduced[1].values())

