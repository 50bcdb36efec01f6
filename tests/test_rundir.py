"""The run folder belongs to one process and survives faults; checkpoints carry checksums.

Function-level tests first (engine/rundir.py, engine/checkpoint.py), then, at the bottom, end-to-end
tests of the training loop and the CLI."""
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pixformer.engine.checkpoint as checkpoint
from pixformer import PixformerError, create_model
from pixformer.engine.checkpoint import (find_checkpoint, load_model, load_tensors, load_weights, read_state,
                                         save_checkpoint)
from pixformer.engine.loop import TIMING_KEYS
from pixformer.engine.rundir import append_metrics, claim, read_metrics, trim_metrics, write_atomically
from pixformer.models.registry import model_spec

SRC = Path(__file__).resolve().parents[1] / "src" / "pixformer"

# A child process that claims a folder, says so and holds it until its stdin closes. It loads rundir.py
# alone (the package's __init__ would import torch): it starts in a fraction of a second.
HOLDER = f"""
import sys, types
for name, sub in (("pixformer", ""), ("pixformer.engine", "/engine")):
    module = types.ModuleType(name)
    module.__path__ = [{str(SRC)!r} + sub]
    sys.modules[name] = module
from pixformer.engine.rundir import claim
folder = claim(sys.argv[1])
print("held", flush=True)
if sys.argv[2] == "die":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.readline()
folder.close()
"""


def hold(run_dir: Path, then: str = "wait") -> subprocess.Popen:
    """A child process holding `run_dir` (then: 'wait' until its stdin closes, or 'die' at once, by SIGKILL)."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), then], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "held\n", child.stderr.read()
    return child


def tiny_model():
    return create_model("vit-n/2", img_size=8, depth=1, dim=16, heads=2)


def save(run_dir: Path, step: int = 1, ema: bool = False, optimizer: bool = False) -> torch.nn.Module:
    """A tiny checkpoint (with the EMA weights and an optimizer's state when asked) in run_dir/checkpoint."""
    model = tiny_model()
    opt = None
    if optimizer:
        opt = torch.optim.AdamW(model.parameters())
        model(torch.zeros(2, 3, 8, 8)).sum().backward()
        opt.step()
    facts = {"classes": ["a", "b"], "in_chans": 3, "img_size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(run_dir, {"step": step, "model": model_spec(model), "data": facts, "train_config": {}}, model, opt,
                    tiny_model() if ema else None)
    return model


def flip_last_byte(path: Path) -> None:
    """Change one byte of the tensor data (the file ends in it), keeping the size."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- the lock ---------------------------------------------------------------------------------------
def test_a_folder_held_by_a_live_process_is_refused_in_one_line(tmp_path):
    child = hold(tmp_path / "run")
    try:
        with pytest.raises(PixformerError) as err:
            claim(tmp_path / "run")
        assert str(err.value) == (f"{tmp_path / 'run'} is in use by process {child.pid} on {socket.gethostname()}; "
                                  "wait for it or choose another --out")
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    with claim(tmp_path / "run") as folder:                 # released: free again
        assert folder.owned and (tmp_path / "run" / ".lock").read_text().split()[0] == str(os.getpid())


def test_the_lock_of_a_killed_process_is_taken_over_in_one_line(tmp_path):
    child = hold(tmp_path / "run", then="die")
    assert child.wait(timeout=10) == -signal.SIGKILL
    said = []
    with claim(tmp_path / "run", say=said.append):
        pass
    assert said == [f"{tmp_path / 'run'} was left locked by process {child.pid} on {socket.gethostname()}, "
                    "which is no longer running; taking it over"]


def test_one_process_holds_a_folder_once_and_release_leaves_it_clean(tmp_path):
    folder = claim(tmp_path / "new")
    with pytest.raises(PixformerError, match=f"in use by process {os.getpid()} "):
        claim(tmp_path / "new")                              # a second claim, even from this process
    folder.close()
    folder.close()                                           # closing twice is harmless
    assert not (tmp_path / "new").exists()                   # created by the claim, nothing written: removed
    (tmp_path / "kept").mkdir()
    with claim(tmp_path / "kept") as folder:
        (tmp_path / "kept" / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["config.json"]   # no .lock left behind
    with claim(tmp_path / "kept", say=pytest.fail):         # a clean release: nothing to say next time
        pass


def test_only_rank_zero_claims(tmp_path):
    with claim(tmp_path / "run", rank=1) as folder:
        assert not folder.owned and not (tmp_path / "run").exists()
    child = hold(tmp_path / "run")
    try:
        assert not claim(tmp_path / "run", rank=1).owned     # not refused: rank 0 speaks for the run
    finally:
        child.stdin.close()
        child.wait(timeout=10)


def test_claim_removes_the_unfinished_writes_a_killed_run_left(tmp_path):
    run = tmp_path / "run"
    (run / ".checkpoint.tmp-abc123").mkdir(parents=True)
    (run / ".checkpoint.tmp-abc123" / "model.safetensors").write_bytes(b"half")
    (run / ".metrics.jsonl.tmp-77-beef").write_text('{"step"')
    (run / "metrics.jsonl").write_text("")
    said = []
    with claim(run, say=said.append):
        assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl"]
    assert len(said) == 1 and "removed 2 unfinished write(s)" in said[0]


# ---- metrics.jsonl -------------------------------------------------------------------------------------
def test_a_torn_last_metrics_line_is_dropped_in_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for tail in ('{"step": 12, "epo', "\0\0\0\0"):          # a kill mid-write; a crash's unwritten block
        path.write_text('{"step": 6, "epoch": 1}\n{"step": 12, "epoch": 2}\n' + tail)
        said = []
        assert read_metrics(path, said.append) == [{"step": 6, "epoch": 1}, {"step": 12, "epoch": 2}]
        assert said == [f"dropped a torn last line of {path}"]
    path.write_text('{"step": 6, "epoch": 1}\n{"step": 12, "epoch": 2}')   # whole, only the newline missing
    assert read_metrics(path, pytest.fail) == [{"step": 6, "epoch": 1}, {"step": 12, "epoch": 2}]
    path.write_text('{"step": 6, "epoch": 1}\nnot json\n{"step": 12, "epoch": 2}\n')
    with pytest.raises(PixformerError, match=r"metrics.jsonl line 2 is not a JSON row"):
        read_metrics(path)
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_trim_keeps_the_rows_up_to_the_checkpoint_or_none_and_append_adds_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": 6 * e, "epoch": e}) + "\n" for e in (1, 2, 3)) + '{"step": 2')
    kept = trim_metrics(path, lambda r: r["epoch"] <= 2, say=lambda m: None)
    assert kept == [{"step": 6, "epoch": 1}, {"step": 12, "epoch": 2}] == read_metrics(path, pytest.fail)
    append_metrics(path, {"step": 18, "epoch": 3, "val_loss": float("nan")})
    assert path.read_text().endswith('{"step": 18, "epoch": 3, "val_loss": NaN}\n')
    assert trim_metrics(path, None) == [] and path.read_text() == ""    # restarted without a checkpoint
    assert trim_metrics(tmp_path / "none.jsonl", None) == [] and not (tmp_path / "none.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]   # no temporary file left
    with pytest.raises(PixformerError, match=r"cannot append to .*missing/metrics.jsonl \(No such file"):
        append_metrics(tmp_path / "missing" / "metrics.jsonl", {"step": 1})


def test_write_atomically_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = write_atomically(tmp_path / "config.json", '{"old": 1}')
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(PixformerError, match=r"cannot write .*config.json \(No space left on device\); the previous"):
        write_atomically(path, '{"new": 1}')
    assert path.read_text() == '{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ---- checkpoints: checksums, fallback, failed writes -----------------------------------------------------
def test_state_json_records_the_checksum_and_size_of_every_tensor_file(tmp_path):
    save(tmp_path, ema=True, optimizer=True)
    ckpt = tmp_path / "checkpoint"
    sums = read_state(ckpt)["checksums"]
    assert sorted(sums) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors"]
    for name, entry in sums.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert find_checkpoint(tmp_path) == ckpt


def test_a_checkpoint_is_as_readable_as_the_umask_makes_a_file_not_private(tmp_path):
    old = os.umask(0o027)            # safetensors writes 0600 files and tempfile 0700 folders of its own
    try:
        save(tmp_path, ema=True, optimizer=True)
    finally:
        os.umask(old)
    ckpt = tmp_path / "checkpoint"
    assert ckpt.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {
        name: 0o640 for name in ("ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json")}


def test_as_created_leaves_links_and_special_bits_alone(tmp_path):
    from pixformer.files import as_created
    folder, target = tmp_path / "f", tmp_path / "target"
    folder.mkdir(mode=0o700)
    (folder / "w").write_text("x")
    (folder / "w").chmod(0o600)
    target.write_text("y")
    target.chmod(0o600)
    (folder / "link").symlink_to(target)
    folder.chmod(0o2700)                                    # setgid: a group-shared folder's files stay the group's
    old = os.umask(0o027)
    try:
        as_created(folder)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o7777 == 0o2750 and (folder / "w").stat().st_mode & 0o777 == 0o640
    assert target.stat().st_mode & 0o777 == 0o600           # what a link points at is not this write's


def test_a_flipped_byte_is_refused_in_one_line_never_loaded(tmp_path):
    model = save(tmp_path)
    ckpt = tmp_path / "checkpoint"
    flip_last_byte(ckpt / "model.safetensors")
    damaged = f"{ckpt / 'model.safetensors'} is damaged (checksum mismatch)"
    for load in (lambda: find_checkpoint(tmp_path), lambda: load_model(tmp_path), lambda: load_model(ckpt)):
        with pytest.raises(PixformerError) as err:
            load()
        assert str(err.value).startswith(damaged + ": this checkpoint cannot be used") and "\n" not in str(err.value)
    with pytest.raises(PixformerError, match=r"is damaged \(checksum mismatch\): its bytes are not those written"):
        load_weights(model, ckpt / "model.safetensors")
    with pytest.raises(PixformerError, match="is damaged"):
        checkpoint.init_from(tiny_model(), tmp_path)


def test_a_truncated_or_missing_file_is_damage_too(tmp_path):
    save(tmp_path, optimizer=True)
    ckpt = tmp_path / "checkpoint"
    opt = ckpt / "optimizer.safetensors"
    size = opt.stat().st_size
    os.truncate(opt, size - 10)
    with pytest.raises(PixformerError, match=rf"optimizer.safetensors is damaged \(truncated: {size - 10} bytes, "
                                             rf"written as {size}\)"):
        find_checkpoint(tmp_path)
    with pytest.raises(PixformerError, match="optimizer.safetensors is damaged"):
        load_tensors(opt)                                    # the loop's resume reads it by path
    opt.unlink()
    with pytest.raises(PixformerError, match="optimizer.safetensors is missing: this checkpoint cannot be used"):
        find_checkpoint(tmp_path)


def test_a_damaged_checkpoint_falls_back_to_a_whole_checkpoint_old_in_one_line(tmp_path, capsys):
    save(tmp_path, step=1)
    shutil.copytree(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    for damage in ("state", "model"):
        if damage == "state":
            (tmp_path / "checkpoint" / "state.json").write_text('{"step": 2, "mod')
        else:
            save(tmp_path / "again", step=2)
            shutil.rmtree(tmp_path / "checkpoint")
            shutil.copytree(tmp_path / "again" / "checkpoint", tmp_path / "checkpoint")
            os.truncate(tmp_path / "checkpoint" / "model.safetensors", 100)
        assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
        assert find_checkpoint(tmp_path / "checkpoint") == tmp_path / "checkpoint.old"
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"{tmp_path / 'checkpoint'} is unreadable (")
        assert err[0].endswith("); using checkpoint.old")
        assert ("state.json is unreadable" if damage == "state" else "model.safetensors is damaged (truncated") in err[0]
    save(tmp_path, step=3)               # the next save replaces the damaged one and keeps checkpoint.old until then
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint" and read_state(tmp_path / "checkpoint")["step"] == 3
    assert not (tmp_path / "checkpoint.old").exists()


def test_with_no_whole_checkpoint_the_error_names_both(tmp_path):
    save(tmp_path)
    shutil.copytree(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    flip_last_byte(tmp_path / "checkpoint.old" / "model.safetensors")
    (tmp_path / "checkpoint" / "state.json").unlink()
    for path in (tmp_path, tmp_path / "checkpoint"):
        with pytest.raises(PixformerError) as err:
            find_checkpoint(path)
        assert str(err.value) == (f"{tmp_path / 'checkpoint' / 'state.json'} is missing: this checkpoint cannot be "
                                  "used, and checkpoint.old is unreadable too (model.safetensors is damaged "
                                  "(checksum mismatch))")


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    model = save(tmp_path)
    path = tmp_path / "checkpoint" / "state.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "checksums"}))
    loaded, _ = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    os.truncate(tmp_path / "checkpoint" / "model.safetensors", (tmp_path / "checkpoint" / "model.safetensors").stat().st_size - 4)
    with pytest.raises(PixformerError, match=r"model.safetensors is damaged \(truncated"):
        find_checkpoint(tmp_path)            # no checksum, but its safetensors header says how long it is


def test_each_file_is_hashed_once_per_process_while_unchanged(tmp_path, monkeypatch):
    save(tmp_path, ema=True, optimizer=True)
    hashed = []
    real = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda p: hashed.append(p.name) or real(p))
    find_checkpoint(tmp_path)
    load_model(tmp_path)
    load_tensors(tmp_path / "checkpoint" / "optimizer.safetensors")
    assert sorted(hashed) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors"]


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, step=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(PixformerError) as err:
        save(tmp_path, step=2)
    assert str(err.value) == (f"cannot write the checkpoint {tmp_path / 'checkpoint'} (No space left on device); "
                              "the previous checkpoint is kept")
    monkeypatch.undo()
    real_save = checkpoint.save_file

    def short(tensors, path, *args):                         # a write that lost its tail without an error
        real_save(tensors, path, *args)
        os.truncate(path, os.path.getsize(path) - 3)
    monkeypatch.setattr(checkpoint, "save_file", short)
    with pytest.raises(PixformerError, match=r"\(model.safetensors came out damaged \(truncated: .*; the previous"):
        save(tmp_path, step=2)
    monkeypatch.undo()
    real_replace = os.replace

    def fail_the_second_rename(src, dst):                   # the old one moved aside, the new one refused
        if Path(src).name.startswith(".checkpoint.tmp-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", fail_the_second_rename)
    with pytest.raises(PixformerError, match=r"\(Read-only file system\); the previous checkpoint is kept"):
        save(tmp_path, step=3)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]     # no temporary folder, no .old
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before
    with pytest.raises(PixformerError, match=r"cannot write the checkpoint .*; no checkpoint was written"):
        monkeypatch.setattr(checkpoint, "save_file", full)
        save(tmp_path / "fresh")


# ---- end to end: the loop and the CLI ------------------------------------------------------------------
# These run pixformer.train / the CLI. Those marked LOOP need engine/loop.py to call rundir.py:
# claim() at the start, trim_metrics() before the first row, append_metrics() for each row.
TINY = dict(model="vit-n/2", data="digits", model_args=dict(depth=1, dim=16, heads=2), batch_size=32,
            train_subset=192, progress=False, epochs=2)            # 6 steps an epoch


def rows(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl, less the timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stopped_at(step: int, out: Path, monkeypatch, resume: bool = False) -> None:
    """Train TINY into `out` (or resume it), stopped by SIGTERM at `step` (a checkpoint is saved there)."""
    import pixformer.engine.loop as loop
    from pixformer import TrainConfig, train
    real = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda s, *a: (os.kill(os.getpid(), signal.SIGTERM) if s == step else None)
                        or real(s, *a))
    with pytest.raises(PixformerError, match="stopped"):
        train(TrainConfig(**TINY, out=str(out), resume=resume))
    monkeypatch.undo()


def test_e2e_LOOP_a_second_process_on_the_same_out_is_refused(tmp_path):
    from pixformer import TrainConfig, train
    out = tmp_path / "run"
    child = hold(out)                                  # the first process, training into `out`
    (out / "config.json").write_text('{"first": true}')
    try:
        with pytest.raises(PixformerError, match=rf"{out} is in use by process {child.pid} on .*; wait for it or "
                                                 "choose another --out"):
            train(TrainConfig(**TINY, out=str(out)))
        with pytest.raises(PixformerError, match="is in use by process"):
            train(TrainConfig(**TINY, out=str(out), resume=True))
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]   # nothing of the refused run's
    assert (out / "config.json").read_text() == '{"first": true}'


def test_e2e_LOOP_a_folder_of_other_files_is_refused_and_kept(tmp_path):
    """--out holding files but no run (a run writes its config.json first): one line, and nothing in it
    replaced or added; an empty folder and a run stopped before its first
    checkpoint (its own config.json) are taken."""
    from pixformer import TrainConfig, train
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own config"}')
    (mine / "metrics.jsonl").write_text("keep\n")
    with pytest.raises(PixformerError, match=r"--out .*mine holds files that are not a pixformer run \(config.json, "
                                             r"metrics.jsonl\); give the run an empty or new folder"):
        train(TrainConfig(**TINY, out=str(mine)))
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "metrics.jsonl"]
    assert (mine / "config.json").read_text() == '{"my": "own config"}'
    assert (mine / "metrics.jsonl").read_text() == "keep\n"
    (tmp_path / "empty").mkdir()
    train(TrainConfig(**{**TINY, "epochs": 1}, out=str(tmp_path / "empty")))
    shutil.rmtree(tmp_path / "empty" / "checkpoint")                          # as if stopped before a checkpoint
    train(TrainConfig(**{**TINY, "epochs": 1}, out=str(tmp_path / "empty")))


def test_e2e_LOOP_a_resume_drops_a_torn_metrics_line_and_removes_unfinished_writes(tmp_path, monkeypatch, capsys):
    from pixformer import TrainConfig, train
    full = train(TrainConfig(**TINY, out=str(tmp_path / "full")))
    stopped_at(8, tmp_path / "cut", monkeypatch)        # epoch 1 logged at step 6, stopped at 8
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "epoch": 2, "lr": 0.0')    # killed while writing the next row
    (tmp_path / "cut" / ".checkpoint.tmp-k1ll3d").mkdir()
    (tmp_path / "cut" / ".checkpoint.tmp-k1ll3d" / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    resumed = train(TrainConfig(**TINY, out=str(tmp_path / "cut"), resume=True))
    assert "dropped a torn last line of" in capsys.readouterr().err
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    assert not list((tmp_path / "cut").glob(".*.tmp-*")) and not (tmp_path / "cut" / ".lock").exists()
    for a, b in zip(full["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)


def test_e2e_LOOP_a_restart_without_a_checkpoint_starts_the_metrics_empty(tmp_path):
    from pixformer import TrainConfig, train
    out = tmp_path / "run"
    train(TrainConfig(**TINY, out=str(out)))
    logged = rows(out)
    shutil.rmtree(out / "checkpoint")                 # as if killed after logging, before the first checkpoint
    train(TrainConfig(**TINY, out=str(out), resume=True))
    assert rows(out) == logged                        # no duplicate rows


def test_e2e_a_damaged_checkpoint_resumes_from_checkpoint_old(tmp_path, monkeypatch, capsys):
    from pixformer import TrainConfig, train
    full = train(TrainConfig(**TINY, out=str(tmp_path / "full")))
    cut = tmp_path / "cut"
    stopped_at(4, cut, monkeypatch)
    shutil.copytree(cut / "checkpoint", tmp_path / "step4")
    stopped_at(8, cut, monkeypatch, resume=True)      # resumed at 4, stopped again at 8
    shutil.copytree(tmp_path / "step4", cut / "checkpoint.old")
    flip_last_byte(cut / "checkpoint" / "model.safetensors")   # the newer checkpoint is damaged
    capsys.readouterr()
    resumed = train(TrainConfig(**TINY, out=str(cut), resume=True))
    err = capsys.readouterr().err
    assert f"{cut / 'checkpoint'} is unreadable (model.safetensors is damaged (checksum mismatch)); " \
           "using checkpoint.old" in err
    assert rows(cut) == rows(tmp_path / "full")
    for a, b in zip(full["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    assert find_checkpoint(cut) == cut / "checkpoint" and not (cut / "checkpoint.old").exists()


def test_e2e_eval_refuses_a_flipped_byte_in_one_line(tmp_path, capsys):
    from pixformer import TrainConfig, train
    from pixformer.cli import main
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1}, out=str(out)))
    flip_last_byte(out / "checkpoint" / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--data", "digits"]) == 2
    got = capsys.readouterr()
    assert got.out == "" and got.err == (f"pixformer: error: {out / 'checkpoint' / 'model.safetensors'} is damaged "
                                         "(checksum mismatch): this checkpoint cannot be used and there is no "
                                         "checkpoint.old beside it\n")
