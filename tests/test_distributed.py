"""Data parallelism under torchrun (2 processes over gloo): every task follows the one-process
trajectory for the same global batch, only rank 0 writes, and the checkpoint loads in one process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pixformer import PixformerError, TrainConfig, load_model, train

SMALL = dict(model_args=dict(depth=1, dim=16, heads=2), data="digits", batch_size=32, epochs=1, progress=False,
             precision="fp32", train_subset=256)
RUNS = {
    "classify": dict(SMALL, model="vit-n/2", crop_padding=1, hflip=True),
    "mae": dict(SMALL, model="vit-n/2", task="mae", task_args=dict(decoder_depth=1, decoder_dim=16, decoder_heads=2)),
    "diffusion": dict(SMALL, model="dit-n/2", task="diffusion", task_args=dict(timesteps=50, samples=0)),
}

SCRIPT = textwrap.dedent("""
    import json, sys
    from pixformer import TrainConfig, train
    runs, out = json.loads(sys.argv[1]), sys.argv[2]
    for name, run in runs.items():
        train(TrainConfig(**run, out=f"{out}/{name}"))
""")


def torchrun(tmp_path, runs: dict, out, nproc: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "ddp_runs.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(script), json.dumps(runs), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_two_ranks_follow_one_process_for_every_task(tmp_path):
    done = torchrun(tmp_path, RUNS, tmp_path / "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1/1") == len(RUNS)               # one process speaks
    for name, run in RUNS.items():
        alone = train(TrainConfig(**run, out=str(tmp_path / "one" / name)))
        model, state = load_model(tmp_path / "ddp" / name)               # a plain checkpoint, one process
        for (k, a), b in zip(alone["model"].state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
        rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
        for a, b in zip(rows(tmp_path / "one" / name), rows(tmp_path / "ddp" / name)):
            for k in a:
                if k.startswith("val_"):
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), f"{name}: {k}"


def test_uneven_global_batch_is_one_line_and_no_process_hangs(tmp_path):
    done = torchrun(tmp_path, {"classify": dict(RUNS["classify"], batch_size=33)}, tmp_path / "bad")
    assert done.returncode != 0
    assert "does not split evenly over 2 processes" in done.stderr


def test_world_size_without_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(PixformerError, match="launch with `torchrun"):
        train(TrainConfig(**RUNS["classify"]))
