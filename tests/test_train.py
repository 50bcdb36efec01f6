import json
import os
import signal

import pytest
import torch
from torch import nn

import pixformer.engine.loop as loop
from pixformer import PixformerError, TrainConfig, create_model, train
from pixformer.engine.checkpoint import find_checkpoint, load_model, load_weights, save_checkpoint
from pixformer.engine.loop import lr_at
from pixformer.engine.optim import param_groups
from pixformer.tasks import Classify
from pixformer.engine.loop import TIMING_KEYS

TINY = dict(model="vit-n/2", data="digits", model_args=dict(depth=1, dim=16, heads=2), batch_size=32,
            train_subset=192, progress=False)


def metrics(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_short_training_run_validates_on_val_and_tests_once_at_the_end(tmp_path):
    result = train(TrainConfig(**{**TINY, "train_subset": None, "model": "vit-n/4",
                                  "model_args": dict(depth=1, dim=32, heads=2), "epochs": 3, "lr": 3e-3,
                                  "out": str(tmp_path / "run")}))
    rows = metrics(tmp_path / "run")
    epochs, final = rows[:-1], rows[-1]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and all("val_top1" in r and "test_top1" not in r for r in epochs)
    assert set(final) == {"step", "epoch", "test_loss", "test_top1", "test_top5"}      # test: once, at the end
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["val_loss"] < 2.0 < 2.302  # well below chance-level cross-entropy log(10)
    # digits: validation is 10 % held out of the 1,438 training images, never the 359 test images
    assert result["val_n"] == 144 and result["test_n"] == 359 and result["test_top1"] > 0.5
    assert result["best_top1"] == max(r["val_top1"] for r in epochs)


KILL_CFG = dict(TINY, epochs=2, ema_decay=0.9, model_args=dict(depth=1, dim=16, heads=2, drop_path=0.1),
                crop_padding=1, task_args=dict(mixup=0.2), checkpoint_every=4, eval_batch_size=64)
# 6 steps per epoch; validation of the 144 held-out images in 3 batches


def assert_same_run(a, b, dir_a, dir_b):
    for x, y in ((a["model"], b["model"]), (a["ema"], b["ema"])):
        for (name, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items()):
            assert torch.equal(p, q), name
    assert metrics(dir_a) == metrics(dir_b)
    assert (a["val_top1"], a["test_top1"]) == (b["val_top1"], b["test_top1"])


def test_prefetching_changes_when_a_batch_is_made_never_what_it_holds(uninterrupted, tmp_path):
    """Batches made on the step's thread (prefetch 0) or 1 / 3 threads ahead: the same run, bit for bit
    (crop, mixup, drop-path and EMA on), with the share of time spent waiting for data logged."""
    full, full_dir = uninterrupted
    for prefetch, threads in ((0, 1), (1, 1), (6, 3)):
        out = tmp_path / f"p{prefetch}"
        got = train(TrainConfig(**KILL_CFG, out=str(out), prefetch=prefetch, loader_threads=threads))
        assert_same_run(full, got, full_dir, out)
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(0 <= r["data_wait"] <= 1 for r in rows if "epoch" in r and "val_loss" in r)


def test_loader_threads_of_a_cpu_step_use_one_torch_thread_and_leave_the_default():
    """A CPU step keeps its cores: each loader thread's torch calls run on one intra-op thread, while the
    caller's count and the one a thread started later begins with stay as they were."""
    import threading
    from pixformer.data.loader import Prefetcher
    before = torch.get_num_threads()
    with Prefetcher(lambda k: (k, torch.get_num_threads()), range(8), threads=3, depth=4, intra_op_threads=1) as made:
        assert list(made) == [(k, 1) for k in range(8)]
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start(), t.join()
    assert torch.get_num_threads() == before and later == [before]
    with Prefetcher(lambda k: torch.get_num_threads(), range(3), threads=2, depth=2) as made:
        assert list(made) == [before] * 3                      # unset: torch's default, as a GPU step has


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return train(TrainConfig(**KILL_CFG, out=str(out))), out


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("where", ["mid-epoch", "inside the optimizer step", "during validation"])
def test_sigterm_anywhere_then_resume_equals_an_uninterrupted_run(where, uninterrupted, tmp_path, monkeypatch):
    full, full_dir = uninterrupted
    out = tmp_path / "killed"
    if where == "mid-epoch":
        real = loop.lr_at
        monkeypatch.setattr(loop, "lr_at", lambda step, *a: (sigterm() if step == 9 else None) or real(step, *a))
    elif where == "inside the optimizer step":   # between the weight update and the step counter
        real_step = torch.optim.AdamW.step
        calls = []

        def step(self, *a, **k):
            out_ = real_step(self, *a, **k)
            calls.append(1)
            if len(calls) == 9:
                sigterm()
            return out_
        monkeypatch.setattr(torch.optim.AdamW, "step", step)
    else:                                        # the first batch of the second epoch's validation
        real_eval = Classify.eval_sums
        calls = []

        def eval_sums(self, *a):
            calls.append(1)
            if len(calls) == 4:
                sigterm()
            return real_eval(self, *a)
        monkeypatch.setattr(Classify, "eval_sums", eval_sums)
    stopped_at = {"mid-epoch": 10, "inside the optimizer step": 9, "during validation": 12}[where]
    with pytest.raises(PixformerError, match=rf"stopped \(SIGTERM\) at step {stopped_at}/12; checkpoint saved"):
        train(TrainConfig(**KILL_CFG, out=str(out)))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == stopped_at                  # the step the signal fell into was finished and counted
    assert state["epochs_logged"] == 1                  # epoch 2's validation: done again after the resume
    monkeypatch.undo()
    resumed = train(TrainConfig(**KILL_CFG, out=str(out), resume=True))
    assert_same_run(full, resumed, full_dir, out)


def test_a_hard_crash_resumes_from_the_last_checkpoint(uninterrupted, tmp_path, monkeypatch):
    """A process that dies without a chance to save (SIGKILL) leaves the checkpoint of step 8
    (checkpoint_every=4); resuming recomputes steps 9-12 and ends exactly as the uninterrupted run."""
    full, full_dir = uninterrupted
    out = tmp_path / "crashed"
    real = loop.lr_at

    def crash(step, *a):
        if step == 10:
            raise SystemExit("killed")
        return real(step, *a)
    monkeypatch.setattr(loop, "lr_at", crash)
    with pytest.raises(SystemExit):
        train(TrainConfig(**KILL_CFG, out=str(out)))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 8
    monkeypatch.undo()
    assert_same_run(full, train(TrainConfig(**KILL_CFG, out=str(out), resume=True)), full_dir, out)


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(**TINY, epochs=1, out=out))
    with pytest.raises(PixformerError, match="already holds a run; pass --resume"):
        train(TrainConfig(**TINY, epochs=1, out=out))
    with pytest.raises(PixformerError, match=r"other settings \(model_args: \{'depth': 1, 'dim': 16, 'heads': 2\} -> "
                                             r"\{'depth': 1, 'dim': 32, 'heads': 2\}\)"):
        train(TrainConfig(**{**TINY, "model_args": dict(depth=1, dim=32, heads=2)}, epochs=1, out=out, resume=True))
    with pytest.raises(PixformerError, match=r"other settings \(batch_size: 32 -> 64; epochs: 1 -> 2; lr: 0.001 -> "
                                             r"0.002; seed: 0 -> 1\)"):
        train(TrainConfig(**{**TINY, "batch_size": 64}, epochs=2, lr=2e-3, seed=1, out=out, resume=True))
    with pytest.raises(PixformerError, match=r"other settings \(data: digits -> "):
        train(TrainConfig(**{**TINY, "data": str(tmp_path)}, epochs=1, out=out, resume=True))
    # how a run executes may change: device, progress, speed switches, micro-batches
    train(TrainConfig(**{**TINY, "progress": True}, epochs=1, out=out, resume=True, speed=dict(attn_backend="math"),
                      accum_steps=2))
    with pytest.raises(PixformerError, match="--resume needs --out"):
        train(TrainConfig(**TINY, resume=True))


def test_runs_are_named_after_the_model_actually_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train(TrainConfig(**{**TINY, "model_args": dict(depth=6, dim=128, heads=4, patch_size=4)}, epochs=1))
    assert result["model_name"] == "vit-n/4"
    assert os.path.basename(result["run_dir"]).startswith("vit-n4-digits-")
    state = json.loads((tmp_path / result["run_dir"] / "checkpoint" / "state.json").read_text())
    assert state["model_name"] == "vit-n/4" and state["model"]["config"]["patch_size"] == 4


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, ema_decay=0.5, out=str(out)))
    ckpt = out / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors",
                                                       "optimizer.safetensors", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["model"]["arch"] == "vit" and state["train_config"]["model_args"]["dim"] == 16
    assert state["task"] == {"name": "classify",
                             "config": {"label_smoothing": 0.1, "mixup": 0.0, "cutmix": 0.0, "eval_flip": False}}
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


def test_weight_decay_by_role_not_by_shape():
    model = create_model("pit-n", img_size=4, depth=1, dim=16, heads=2)
    model.mask_token = nn.Parameter(torch.zeros(1, 1, 16))     # a 3-D token: no decay
    model.table2d = nn.Parameter(torch.zeros(4, 16))           # a 2-D embedding: no decay either
    model.conv = nn.Conv2d(3, 4, 3)                            # a 4-D conv weight: decayed
    decay, rest = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in rest["params"]} >= {"cls_token", "pos_table", "norm.weight", "head.bias",
                                                      "mask_token", "table2d", "conv.bias"}
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.attn.qkv.weight", "patch_embed.weight", "conv.weight"}
    assert not {names[id(p)] for p in decay["params"]} & {names[id(p)] for p in rest["params"]}


def test_run_records_the_speed_settings_it_resolved(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, out=str(out), precision="fp32"))
    speed = json.loads((out / "checkpoint" / "state.json").read_text())["speed"]
    assert speed["selective_checkpoint"] is False            # a tiny step: not worth its per-op cost
    assert speed["precision"] == "float32" and speed["attn_backend"] == "auto" and speed["allocator"] == "auto"
    with pytest.raises(PixformerError, match="allocator policy must be one of"):
        train(TrainConfig(**TINY, epochs=1, out=str(tmp_path / "bad"), speed=dict(allocator="fast")))
    assert not (tmp_path / "bad").exists()                   # refused before any work


def test_bad_task_and_model_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(PixformerError, match=r"unknown task 'segment'; choose from classify \| diffusion \| mae \| probe"):
        train(TrainConfig(**TINY, task="segment", out=str(tmp_path / "a")))
    with pytest.raises(PixformerError, match=r"task 'classify' has no setting\(s\) \['mask_ratio'\]"):
        train(TrainConfig(**TINY, task_args=dict(mask_ratio=0.75), out=str(tmp_path / "b")))
    with pytest.raises(PixformerError, match=r"vit-n/2 \(vit\) has no setting\(s\) \['kernel_size'\]"):
        train(TrainConfig(**{**TINY, "model_args": dict(kernel_size=3)}, out=str(tmp_path / "c")))
    with pytest.raises(PixformerError, match=r"label_smoothing must be in \[0, 1\)"):
        train(TrainConfig(**TINY, task_args=dict(label_smoothing=1.5), out=str(tmp_path / "d")))
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_one_process_runtime_and_a_launch_without_torchrun_refused(monkeypatch):
    from pixformer import Runtime
    rt = Runtime.create("cpu")
    assert rt.is_main and rt.world_size == 1 and rt.all_reduce({"n": 3, "top1": 2.0}) == {"n": 3, "top1": 2.0}
    assert rt.part(64) == slice(0, 64)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(PixformerError, match="without torchrun"):
        Runtime.create("cpu")
    with pytest.raises(PixformerError, match="unknown device 'gpu0'"):
        monkeypatch.delenv("WORLD_SIZE") or Runtime.create("gpu0")


def test_a_relative_data_root_is_saved_absolute(tmp_path, monkeypatch):
    """--data-root typed relative is stored resolved, so eval and resume find it from another folder."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(**{**TINY, "data_root": "cache/data"})
    assert cfg.data_root == str(tmp_path.resolve() / "cache" / "data")
    assert TrainConfig(**TINY).data_root is None


def test_accumulated_micro_batches_make_the_same_step(tmp_path, monkeypatch):
    """--accum-steps: a ViT's step in 3 micro-batches updates the weights as the step in one pass (the
    same augmentation, MAE masks and losses; only the order of the sums differs); ConvMixer trains with
    BatchNorm over each micro-batch; a micro-batch count a step cannot hold is one line, before any work."""
    mae = dict(task="mae", task_args=dict(decoder_depth=1, decoder_dim=16, decoder_heads=2))
    seen, loss = [], Classify.loss
    monkeypatch.setattr(Classify, "loss", lambda self, model, x, *a: seen.append(len(x)) or loss(self, model, x, *a))
    for name, extra in {"classify": dict(hflip=True, crop_padding=1, random_erase=0.5), "mae": mae}.items():
        runs = [train(TrainConfig(**TINY, **extra, epochs=1, precision="fp32", accum_steps=k,
                                  out=str(tmp_path / f"{name}{k}"))) for k in (1, 3)]
        if name == "classify":                   # 6 steps of 32 images: in one pass, then in parts of 11, 11, 10
            assert seen == [32] * 6 + [11, 11, 10] * 6
        for (key, a), b in zip(runs[0]["model"].state_dict().items(), runs[1]["model"].state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
        one, three = metrics(tmp_path / f"{name}1"), metrics(tmp_path / f"{name}3")
        losses = lambda rows: [r["train_loss"] for r in rows if "train_loss" in r]  # noqa: E731
        assert losses(one) and losses(one) == pytest.approx(losses(three), rel=1e-6)
    conv = train(TrainConfig(**{**TINY, "model": "convmixer-256/8", "model_args": dict(dim=8, depth=1)}, epochs=1,
                             accum_steps=4, out=str(tmp_path / "convmixer")))
    assert conv["step"] == 192 // 32 and torch.isfinite(torch.tensor(conv["val_loss"]))
    within = r"--accum-steps must be in \[1, --batch-size 32\] \(micro-batches a step\), got "
    for bad, message in [(dict(accum_steps=0), within + "0"), (dict(accum_steps=33), within + "33"),
                         (dict(accum_steps=2, max_side=8), "a packed batch at native resolution cannot be split"),
                         (dict(batch_size=512, accum_steps=200), "splits the 192 images each process trains a step "
                                                                 "into micro-batches: at most 192")]:
        with pytest.raises(PixformerError, match=message):
            train(TrainConfig(**{**TINY, **bad}, epochs=1, out=str(tmp_path / "bad")))
        assert not (tmp_path / "bad").exists()


def test_micro_batches_cover_the_rows_once():
    assert loop.micro_batches(10, 3) == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert loop.micro_batches(4, 4) == [slice(i, i + 1) for i in range(4)]
    assert loop.micro_batches(7, 1) == [slice(0, 7)]


def test_a_warm_up_as_long_as_the_run_is_said(tmp_path, capsys):
    for epochs, said in ((1, True), (2, False)):                     # --warmup-epochs 1 by default
        train(TrainConfig(**{**TINY, "epochs": epochs, "train_subset": 64}, out=str(tmp_path / str(epochs))))
        out = capsys.readouterr()
        assert ("warms up over the whole run (--warmup-epochs 1, --epochs 1)" in out.out + out.err) is said


def test_a_task_setting_is_checked_when_the_config_is_made():
    with pytest.raises(PixformerError, match=r"task 'classify' has no setting\(s\) \['label_smothing'\]"):
        TrainConfig(task_args={"label_smothing": 0.1})
    with pytest.raises(PixformerError, match="--eval-flip must be true or false, got 3"):
        TrainConfig(task_args={"eval_flip": 3})


def test_resuming_a_new_folder_starts_quietly_and_a_run_stopped_before_its_first_checkpoint_says_so(tmp_path, capsys):
    run = dict(model="vit-n/4", model_args=dict(depth=1, dim=16, heads=2), data="digits", epochs=1, train_subset=64,
               batch_size=32, precision="fp32", progress=False, resume=True)      # as the demo runs its models
    train(TrainConfig(**run, out=str(tmp_path / "new")))
    assert "no checkpoint" not in capsys.readouterr().out
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    train(TrainConfig(**run, out=str(tmp_path / "stopped")))
    assert "(stopped before its first one); starting from scratch" in capsys.readouterr().out
