import json

import pytest
import torch

import pixformer.train as train_mod
from pixformer import PixformerError, create_model
from pixformer.checkpoint import find_checkpoint, load_model, load_weights, save_checkpoint
from pixformer.train import TrainConfig, lr_at, train

TINY = dict(model="vit-n/2", data="digits", depth=1, dim=16, heads=2, batch_size=32, train_subset=192,
            progress=False)


def metrics(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]


def test_short_training_run_lowers_the_loss(tmp_path):
    result = train(TrainConfig(**{**TINY, "train_subset": None, "model": "vit-n/4", "dim": 32, "epochs": 3,
                                  "lr": 3e-3, "out": str(tmp_path / "run")}))
    rows = metrics(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_loss"] < 2.0 < 2.302  # well below chance-level cross-entropy log(10)
    assert result["top1"] > 0.5 and result["val_split"] == "test" and result["n"] == 359


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = dict(TINY, epochs=2, ema_decay=0.9, drop_path=0.1, crop_padding=1, mixup=0.2, checkpoint_every=4)
    full = train(TrainConfig(**cfg, out=str(tmp_path / "full")))

    real_lr_at = train_mod.lr_at

    def killed_at_step_9(step, *args):  # 6 steps per epoch: step 9 is in the middle of epoch 2
        if step == 9:
            raise KeyboardInterrupt
        return real_lr_at(step, *args)
    monkeypatch.setattr(train_mod, "lr_at", killed_at_step_9)
    with pytest.raises(PixformerError, match="interrupted at step 9/12; checkpoint saved"):
        train(TrainConfig(**cfg, out=str(tmp_path / "killed")))
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 9
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    resumed = train(TrainConfig(**cfg, out=str(tmp_path / "killed"), resume=True))

    for a, b in ((full["model"], resumed["model"]), (full["ema"], resumed["ema"])):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    assert metrics(tmp_path / "full") == metrics(tmp_path / "killed")
    assert resumed["top1"] == full["top1"]


def test_existing_run_needs_resume_and_the_same_model(tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(**TINY, epochs=1, out=out))
    with pytest.raises(PixformerError, match="already holds a run; pass --resume"):
        train(TrainConfig(**TINY, epochs=1, out=out))
    with pytest.raises(PixformerError, match=r"different model \(differs in \['dim'\]\)"):
        train(TrainConfig(**{**TINY, "dim": 32}, epochs=1, out=out, resume=True))
    with pytest.raises(PixformerError, match="--resume needs --out"):
        train(TrainConfig(**TINY, resume=True))


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, ema_decay=0.5, out=str(out)))
    ckpt = out / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors",
                                                       "optimizer.safetensors", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["model"]["arch"] == "vit" and state["train_config"]["dim"] == 16
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint.tmp")]
    model, _ = load_model(out)
    assert not model.training and model.cfg.in_chans == 1


def test_checkpoint_swap_survives_a_kill_between_renames(tmp_path):
    model = create_model("vit-n/2", img_size=8, depth=1, dim=16, heads=2)
    save_checkpoint(tmp_path, {"step": 1, "model": {}}, model)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # as if killed after the first rename
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    save_checkpoint(tmp_path, {"step": 2, "model": {}}, model)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert not (tmp_path / "checkpoint.old").exists()


def test_weights_of_another_architecture_are_named(tmp_path):
    small = create_model("vit-n/2", img_size=8, depth=1, dim=16, heads=2)
    save_checkpoint(tmp_path, {"model": {}}, small)
    other = create_model("vit-n/2", img_size=8, depth=2, dim=32, heads=2, pool="mean")
    with pytest.raises(PixformerError, match=r"does not fit this architecture: missing \['blocks\.1\..*"
                                             r"unexpected \['cls_token'\].*shape mismatch"):
        load_weights(other, tmp_path / "checkpoint" / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(PixformerError, match="not a readable safetensors file"):
        load_weights(small, tmp_path / "junk.safetensors")


def test_learning_rate_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = create_model("pit-n", img_size=4, depth=1, dim=16, heads=2)
    decay, rest = train_mod.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in rest["params"]} >= {"cls_token", "pos_table", "norm.weight", "head.bias"}
    assert "blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}


def test_run_records_the_speed_settings_it_resolved(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, out=str(out), precision="fp32"))
    speed = json.loads((out / "checkpoint" / "state.json").read_text())["speed"]
    assert speed["selective_checkpoint"] is False            # a tiny step: not worth its per-op cost
    assert speed["precision"] == "float32" and speed["attn_backend"] == "auto" and speed["allocator"] == "auto"
    with pytest.raises(PixformerError, match="allocator policy must be one of"):
        train(TrainConfig(**TINY, epochs=1, out=str(tmp_path / "bad"), allocator="fast"))
    assert not (tmp_path / "bad").exists()                   # refused before any work
