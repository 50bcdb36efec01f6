"""torchrun with 2 processes over gloo: data parallelism (DDP, FSDP2) and sequence parallelism follow the
one-process trajectory for the same global batch, only rank 0 writes, checkpoints load in one process,
a killed rank's restart resumes to the same result, and bad settings are one line; `pixformer launch`
stops and continues with pixformer's lines alone."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pixformer import PixformerError, TrainConfig, create_model, load_model, train

SMALL = dict(model_args=dict(depth=1, dim=16, heads=2), data="digits", batch_size=32, epochs=1, progress=False,
             precision="fp32", train_subset=256)
RUNS = {
    "classify": dict(SMALL, model="vit-n/2", crop_padding=1, hflip=True),
    "repeat-aug": dict(SMALL, model="vit-n/2", hflip=True, rand_augment=[2, 9], random_erase=0.25, repeat_aug=3),
    "mae": dict(SMALL, model="vit-n/2", task="mae", task_args=dict(decoder_depth=1, decoder_dim=16, decoder_heads=2)),
    "diffusion": dict(SMALL, model="dit-n/2", task="diffusion", task_args=dict(timesteps=50, samples=0)),
    "batch-over-the-set": dict(SMALL, model="vit-n/2", batch_size=512, train_subset=96),   # a batch of all 96
    "native": dict(SMALL, model="vit-n/2", max_side=8, resolution_range=[4, 8], token_drop=0.25, pack_length=40),
    "sequence-parallel": dict(SMALL, model="pit-n", img_size=5, seq_parallel=2, seq_sharding="strided", ema_decay=0.9,
                              seq_regather=True),
    "fsdp": dict(SMALL, model="vit-n/2", fsdp=True, hflip=True),
    "fsdp-mae": dict(SMALL, model="vit-n/2", task="mae", fsdp=True,
                     task_args=dict(decoder_depth=1, decoder_dim=16, decoder_heads=2, samples=2)),
    "fsdp-diffusion": dict(SMALL, model="dit-n/2", task="diffusion", fsdp=True,
                           task_args=dict(timesteps=50, samples=2, sample_steps=5)),
    "flow": dict(SMALL, model="dit-n/2", task="diffusion", model_args=dict(SMALL["model_args"], embed_rank=4),
                 task_args=dict(process="flow", samples=2, sample_steps=3, cfg_interval=[0.1, 0.9])),
}
RUNS.update({f"accum-{name}": dict(RUNS[name], accum_steps=2)     # micro-batches: the ranks average once a step
             for name in ("mae", "diffusion", "fsdp", "sequence-parallel")})
ALONE = dict(seq_parallel=1, fsdp=False)   # the same run in one process

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
    assert "returned a view tensor" not in done.stderr                # FSDP2's warning on MAE's output: not for us
    for name, run in RUNS.items():
        alone = train(TrainConfig(**{**run, **ALONE}, out=str(tmp_path / "one" / name)))
        model, state = load_model(tmp_path / "ddp" / name, weights="model")   # a plain checkpoint, one process
        for (k, a), b in zip(alone["model"].state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
        figure = {"fsdp-mae": "reconstructions", "fsdp-diffusion": "samples"}.get(name)
        if figure:                                  # every rank ran the figure's forwards, rank 0 wrote it
            assert (tmp_path / "ddp" / name / figure / "epoch001.png").exists()
        rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
        for a, b in zip(rows(tmp_path / "one" / name), rows(tmp_path / "ddp" / name)):
            for k in a:
                if k.startswith("val_"):
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), f"{name}: {k}"


def test_world_size_without_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(PixformerError, match="launch with `pixformer launch --nproc-per-node N train"):
        train(TrainConfig(**RUNS["classify"]))


SEQUENCE_CHECK = textwrap.dedent("""
    import itertools, json
    import torch, torch.distributed as dist
    from pixformer.engine.perf import apply_activation_checkpointing
    from pixformer.engine.sequence import SequenceParallel, average_gradients
    from pixformer.models.attention import set_attention_backend
    from pixformer.models.vit import ViTConfig, VisionTransformer

    dist.init_process_group("gloo")
    failures, checked = [], 0
    for P in (1, 2):
        group = dist.new_subgroups(group_size=P)[0]
        for pool, pos, sharding, regather, backend, ckpt in [*itertools.product(
                ("cls", "mean"), ("learned", "sincos2d"), ("contiguous", "strided", "random"), (False, True),
                ("auto", "blocked"), (None,)), ("cls", "learned", "strided", False, "auto", "selective"),
                ("cls", "learned", "strided", False, "auto", "full"),             # below: the first layer
                ("cls", "learned", "strided", 1, "auto", None), ("mean", "sincos2d", "random", 1, "blocked", None),
                ("cls", "learned", "contiguous", 1, "auto", "selective")]:      # regathers, the second keeps
            side = 5                                                # 26 tokens with a class token, 25 without
            torch.manual_seed(0)
            model = VisionTransformer(ViTConfig(img_size=(side, side), patch_size=1, num_classes=4, depth=2, dim=16,
                                                heads=2, pool=pool, pos_embed=pos, fc_norm=pool == "mean"))
            torch.nn.init.normal_(model.head.weight, std=0.02)     # not zero: gradients reach the encoder
            set_attention_backend(model, backend)
            images, weights = torch.randn(3, 3, side, side), torch.randn(3, 4)
            ref = model(images)                                    # the whole sequence in this process
            (ref * weights).sum().backward()
            want = {k: p.grad.clone() for k, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            if ckpt:                                                # the collectives run again in the recompute
                apply_activation_checkpointing(model, "all" if ckpt == "full" else 0, selective=ckpt == "selective")
            out = SequenceParallel(model, group, sharding, seed=3, regather=regather)(images)
            (out * weights).sum().backward()
            average_gradients(model)
            name = f"P={P} {pool} {pos} {sharding} regather={regather} {backend} checkpoint={ckpt}"
            checked += 1
            if not torch.allclose(out, ref, atol=1e-5, rtol=1e-5):
                failures.append(f"{name}: outputs differ by {(out - ref).abs().max():.2e}")
            failures += [f"{name}: grad of {k} differs by {(p.grad - want[k]).abs().max():.2e}"
                         for k, p in model.named_parameters() if not torch.allclose(p.grad, want[k], atol=1e-5, rtol=1e-4)]
    for rank in range(dist.get_world_size()):               # one line each, never interleaved
        if rank == dist.get_rank():
            print(json.dumps({"checked": checked, "failures": failures[:10]}), flush=True)
        dist.barrier()
    dist.destroy_process_group()
""")


def test_sequence_parallel_outputs_and_gradients_equal_one_process(tmp_path):
    """p = 1 and 2 ranks per sequence, class token and mean pooling, learned and sincos positions, each
    shard assignment, shards of equal (class token: 26) and unequal (25) length, gathered keys kept
    or gathered again in the backward in every layer or in the first alone, two attention backends,
    blocks checkpointed selectively or in full."""
    script = tmp_path / "sequence_check.py"
    script.write_text(SEQUENCE_CHECK)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2
    for r in reports:
        assert r["checked"] == 106 and r["failures"] == [], r["failures"]


def test_shard_assignments_cover_every_token_once():
    from pixformer.engine.sequence import shard_tokens
    for sharding in ("contiguous", "strided", "random"):
        for cls in (False, True):
            shards = shard_tokens(25, 4, sharding, cls=cls, seed=1)
            every = torch.cat(shards).sort().values
            assert torch.equal(every, torch.arange(25 + cls))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1 + cls
            if cls:
                assert shards[0][0] == 0
    assert torch.equal(shard_tokens(8, 2, "strided")[1], torch.tensor([1, 3, 5, 7]))
    assert not torch.equal(shard_tokens(64, 2, "random", seed=0)[0], shard_tokens(64, 2, "random", seed=1)[0])
    with pytest.raises(PixformerError, match="cannot be split over 4"):
        shard_tokens(3, 4)


@pytest.mark.parametrize("settings, message", [
    (dict(seq_parallel=2), "launch with `pixformer launch --nproc-per-node N train ...` .or torchrun"),
    (dict(fsdp=True), "launch with `pixformer launch"),
    (dict(seq_parallel=2, task="mae"), "--seq-parallel splits each square image.s tokens over ranks; --task mae cannot"),
    (dict(seq_parallel=2, max_side=8, crop_padding=0, hflip=False), "images packed at native resolution .* are not split"),
    (dict(seq_parallel=2, speed={"attn_backend": "varlen"}), "cannot attend over keys gathered"),
    (dict(fsdp=True, ema_decay=0.99), "cannot be combined with --fsdp"),
    (dict(seq_parallel=0), "--seq-parallel must be at least 1"),
    (dict(seq_sharding="diagonal"), "--seq-sharding must be one of"),
    (dict(seq_regather="some"), "^--seq-regather must be auto, all, none or a number of layers, got 'some'$"),
    (dict(seq_parallel=2, seq_regather=2), "^--seq-regather 2 is more layers than the model's 1$"),
])
def test_parallel_settings_refused_in_one_line(settings, message):
    with pytest.raises(PixformerError, match=message):
        train(TrainConfig(**{**RUNS["classify"], **settings}))


def test_a_run_saved_with_seq_regather_true_or_false_resumes_with_all_or_none(tmp_path):
    """Runs saved --seq-regather as a boolean before it took auto, all, none or a number of layers."""
    from pixformer.engine.config import as_json, changed_settings
    for old, new in ((True, "all"), (False, "none")):
        run = tmp_path / str(old)
        run.mkdir()
        saved = {**as_json(TrainConfig(**RUNS["sequence-parallel"])), "seq_regather": old}
        (run / "config.json").write_text(json.dumps(saved))
        cfg = TrainConfig.from_run(str(run), resume=True)
        assert cfg.seq_regather == new and changed_settings(saved, cfg) == []


REFUSALS = textwrap.dedent("""
    import json, os, sys
    from pixformer import PixformerError, TrainConfig, train
    runs, out = json.loads(sys.argv[1]), sys.argv[2]
    said = {}
    for name, run in runs.items():
        folder = f"{out}/{name}" + (f"-rank{os.environ['RANK']}" if run.pop("folder_per_rank", False) else "")
        try:
            train(TrainConfig(**run, out=folder))
        except PixformerError as e:
            said[name] = str(e)
    with open(f"{out}.rank{os.environ['RANK']}.json", "w") as f:    # one file a rank: their prints interleave
        json.dump(said, f)
""")


def test_bad_settings_under_torchrun_are_refused_on_every_rank_and_none_hangs(tmp_path):
    runs = {"uneven": (dict(RUNS["classify"], batch_size=33), "does not split evenly over 2 processes"),
            "indivisible": (dict(RUNS["classify"], seq_parallel=3), "does not divide the world size 2"),
            "few-tokens": (dict(RUNS["sequence-parallel"], model="vit-n/4", img_size=4, seq_parallel=2),
                           "cannot be split over 2"),
            "one-folder-each": (dict(RUNS["classify"], resume=True, folder_per_rank=True),   # rank 0's holds a run
                                "at different steps (or some find no checkpoint there)")}
    train(TrainConfig(**RUNS["classify"], out=str(tmp_path / "bad" / "one-folder-each-rank0")))
    script = tmp_path / "refusals.py"
    script.write_text(REFUSALS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), json.dumps({k: run for k, (run, _) in runs.items()}), str(tmp_path / "bad")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]            # each refused alike on both ranks: nobody waits
    for rank in (0, 1):
        said = json.loads((tmp_path / f"bad.rank{rank}.json").read_text())
        for name, (_, message) in runs.items():
            assert message in said.get(name, ""), (rank, name, said)


RESTART = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    from pathlib import Path
    from pixformer import TrainConfig, train
    run, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        def kill_after_first_checkpoint():       # a rank dies mid-run, after a checkpoint was written
            while not (out / "checkpoint" / "state.json").exists():
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    train(TrainConfig(**run, out=str(out), resume=True))
""")


ONE_STEP = textwrap.dedent("""
    import json, sys
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from pixformer import TrainConfig, create_model, train
    from pixformer.engine import optim
    from pixformer.engine.optim import build_optimizer
    from pixformer.engine.runtime import Runtime
    def ns_fp32(grad, coefficients, steps, eps):   # torch's Newton-Schulz iteration, one matrix, in fp32
        a, b, c = coefficients
        tall = grad.size(0) > grad.size(1)
        x = grad.float().T if tall else grad.float()
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if tall else x
    runtime = Runtime.create("cpu", fsdp=True)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    def stepped(optimizer, how, name="vit-n/2"):   # steps of a model whose head is not zero
        torch.manual_seed(0)
        sizes = dict(dim=16, heads=2) if name.startswith("vit") else dict(patch_size=2, kernel_size=3)
        model = create_model(name, img_size=8, num_classes=10, depth=2, **sizes)   # two matrices of a shape
        torch.nn.init.normal_(model.head.weight)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        model = runtime.wrap(model) if how == "sharded" else model   # "replicated": both ranks the same model
        replicas = torch.distributed.group.WORLD if how == "replicated" else None
        opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=0.05), replicas=replicas)
        for group in opt.param_groups:
            group["lr"] = 0.05 * group["lr_scale"]
        for _ in range(3 if optimizer == "muon" else 1):   # Muon's later steps see its momentum (per shard)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return start, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    stacked = optim.newton_schulz                # pixformer's stacked iteration, replaced for the comparison
    optim.newton_schulz = lambda mats, coefficients, steps, eps, dtype: [ns_fp32(m, coefficients, steps, eps)
                                                                         for m in mats]
    out = {}                                     # per tensor: max |sharded (replicated) - one process|, max |step|
    for optimizer, name, how in (("lamb", "vit-n/2", "sharded"), ("muon", "vit-n/2", "sharded"),
                                 ("muon", "convmixer-16/2", "sharded"), ("muon", "vit-n/2", "replicated"),
                                 ("muon", "convmixer-16/2", "replicated")):
        _, other = stepped(optimizer, how, name)
        start, plain = stepped(optimizer, "alone", name)
        out[f"{optimizer} {name} {how}"] = {k: [(other[k] - v).abs().max().item(), (v - start[k]).abs().max().item()]
                                            for k, v in plain.items()}
    optim.newton_schulz = stacked                # the run below: as shipped
    if runtime.is_main:
        print("STEP " + json.dumps(out), flush=True)
    run, where = json.loads(sys.argv[1]), sys.argv[2]
    train(TrainConfig(**run, out=where))
""")


def test_lamb_and_muon_shard_under_fsdp_and_resume_exactly(tmp_path):
    """Under FSDP2, LAMB's norms and Muon's Newton-Schulz iteration are the whole tensors' (DTensor's
    collectives): a step (Muon: three, its momentum kept per shard) equals one process's to float
    rounding (an orthogonalisation of each shard alone would be off by the size of the step; a
    ConvMixer's filter banks too, each as its out x in*k*k matrix, gathered whole). So does Muon's step
    on whole matrices replicated over the ranks (DDP), its iteration dealt out over them. Muon's
    iteration is compared in fp32: where a device computes bf16 natively it runs in bf16 (torch's
    choice), whose rounding the iteration amplifies in the directions a low-rank gradient leaves empty
    (on this model bf16 and fp32 steps differ by most of a step), so there a step over two processes
    (each stacking the matrices dealt to it) differs from one process's as much. A Muon run whose rank
    is killed restarts and resumes to the uninterrupted run bit for bit: both optimizers' state (Muon's
    matrices, AdamW's other parameters) gathered into one checkpoint and sharded again."""
    run = dict(RUNS["fsdp"], optimizer="muon", epochs=2, checkpoint_every=3)
    script = tmp_path / "one_step.py"
    script.write_text(ONE_STEP)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, str(script), json.dumps(run), str(tmp_path / "whole")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("STEP "))[5:])
    for optimizer, step in steps.items():
        for name, (diff, moved) in step.items():
            assert diff <= 1e-6 + 1e-4 * moved, f"{optimizer}: {name}"
    for how in ("sharded", "replicated"):
        assert all(steps[f"muon vit-n/2 {how}"][f"blocks.0.{m}.weight"][1] > 5e-3
                   for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
        assert all(steps[f"muon convmixer-16/2 {how}"][f"blocks.0.{m}.0.weight"][1] > 5e-3 for m in ("spatial", "channel"))
    script = tmp_path / "restart.py"
    script.write_text(RESTART)
    done = subprocess.run([*launch, "--max-restarts", "1", str(script), json.dumps(run), str(tmp_path / "killed")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout and "exitcode: -9" in done.stderr
    assert "pixformer: restart 1 of 1 after a process of this run ended; resuming from the last checkpoint" in done.stderr
    (whole, _), (killed, _) = load_model(tmp_path / "whole"), load_model(tmp_path / "killed")
    for (k, a), b in zip(whole.state_dict().items(), killed.state_dict().values()):
        assert torch.equal(a, b), k
    last = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])   # noqa: E731
    assert last(tmp_path / "killed")["test_top1"] == last(tmp_path / "whole")["test_top1"]


def test_sequence_and_data_parallel_compose_over_four_ranks(tmp_path):
    """P = 2 ranks per image x D = 2 data-parallel groups (4 processes) == one process."""
    run = dict(RUNS["sequence-parallel"], seq_sharding="random", crop_padding=1, hflip=True, ema_decay=0.0)
    done = torchrun(tmp_path, {"composed": run}, tmp_path / "pd", nproc=4)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sequence parallel P=2: keys/values gathered again in all 1 layers" in done.stdout   # said once
    assert done.stdout.count("sequence parallel P=2") == 1
    alone = train(TrainConfig(**{**run, **ALONE}, out=str(tmp_path / "one")))
    model, _ = load_model(tmp_path / "pd" / "composed")
    for (k, a), b in zip(alone["model"].state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)
    last = json.loads((tmp_path / "pd" / "composed" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_top1"] == pytest.approx(alone["test_top1"], abs=1e-6)


def test_under_fsdp_only_rank_zero_builds_the_whole_model():
    from pixformer.engine.runtime import Runtime
    from pixformer.models.registry import create_model
    for rank, device in ((0, "cpu"), (1, "meta")):
        runtime = Runtime(torch.device("cpu"), rank=rank, world_size=2, fsdp=True)
        with runtime.building():
            model = create_model("pit-n", img_size=4, depth=1)
        assert runtime.holds_weights == (rank == 0)
        assert {p.device.type for p in model.parameters()} == {device}


FAULT = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    import pixformer.engine.loop as loop
    from pixformer.cli import main
    from pixformer.tasks import Classify
    rank, at, kind = int(os.environ["RANK"]), int(sys.argv[1]), sys.argv[2]
    real_lr, real_loss = loop.lr_at, Classify.loss
    def lr_at(step, *a):                            # on rank 1 alone, at step `at`
        if rank == 1 and step == at and kind in ("SIGTERM", "SIGKILL"):
            os.kill(os.getpid(), getattr(signal, kind))
        return real_lr(step, *a)
    def loss(self, model, x, y, rng):
        value, stats = real_loss(self, model, x, y, rng)
        nan = rank == 1 and kind == "nan" and loop.lr_at.step == at
        return (value * float("nan") if nan else value), stats
    def counting_lr(step, *a):
        counting_lr.step = step
        return lr_at(step, *a)
    loop.lr_at = counting_lr
    Classify.loss = loss
    code = main(["train", *sys.argv[3:]])
    print(f"rank {rank} exits {code}", flush=True)
    sys.exit(code)
""")


@pytest.mark.parametrize("kind", ["nan", "SIGTERM", "SIGKILL"])
def test_the_ranks_decide_together(kind, tmp_path):
    """A non-finite loss or a stop signal on one rank of two: both stop after the same step, one line is
    printed; a rank that dies leaves its peer one line, not a collective's traceback."""
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    out = tmp_path / "run"
    args = ["--model", "vit-n/2", "--data", "digits", "--depth", "1", "--dim", "16", "--heads", "2",
            "--batch-size", "32", "--epochs", "2", "--train-subset", "256", "--precision", "fp32",
            "--progress", "false", "--checkpoint-every", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), "5", kind, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "pixformer: error:" in line
              or "pixformer: stopped" in line]                   # a stop asked is no error: its own line
    assert len(errors) == 1, done.stderr[-3000:]
    assert not any("Traceback" in line for line in done.stderr.splitlines() if line.startswith("[rank0]")), done.stderr[-3000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    if kind == "nan":        # nothing of step 5 applied on any rank; the last checkpoint (step 4) kept
        assert "loss became non-finite" in errors[0] and "at step 5" in errors[0]
        assert done.stdout.count("exits 2") == 2 and state["step"] == 4
    elif kind == "SIGTERM":  # both finish step 5 and stop after it, checkpointed
        assert "pixformer: stopped (asked of another process of this run) at step 6/" in errors[0]   # rank 0 speaks
        assert done.stdout.count("exits 143") == 2 and state["step"] == 6     # 128 + SIGTERM, on both ranks
    else:
        assert "another process of this run stopped or died" in errors[0] and "rank 0" not in errors[0]
        assert state["step"] == 4


# ---- pixformer launch ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    ([], "give the number of processes"),
    (["--nproc-per-node", "0", "train"], "--nproc-per-node must be at least 1, got 0"),
    (["--nproc-per-node", "two", "train"], "invalid int value: 'two'"),
    (["--nprocs", "2", "train"], "pixformer launch has no option --nprocs"),
    (["--nproc-per-node", "2", "--max-restarts", "-1", "train"], "--max-restarts must be 0 or more"),
    (["--nproc-per-node", "2", "eval", "--checkpoint", "x"], "runs `pixformer train` over processes"),
    (["--nproc-per-node", "2"], "(got nothing)"),
    (["--nproc-per-node", "2", "--max-restarts", "1", "train", "--out", "x"], "give train --resume true and --out"),
    (["--nproc-per-node", "2", "--max-restarts", "1", "train", "--resume", "false"], "give train --resume true"),
])
def test_launch_refuses_what_it_cannot_run_in_one_line_before_starting_a_process(argv, message, capsys):
    from pixformer.cli import main
    assert main(["launch", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


LAUNCH_TRAIN = ["train", "--model", "vit-n/4", "--data", "digits", "--depth", "1", "--dim", "16", "--heads", "2",
                "--epochs", "5000", "--progress", "false"]


def test_launch_stops_with_the_ranks_one_line_and_continues_from_it(tmp_path):
    """Signalled as a terminal's Ctrl-C or a scheduler signals (the whole process group), the launch ends
    with rank 0's line naming the command that continues the run, exit code 128 + the signal, no
    traceback of torchrun's; that command resumes; bad input inside the ranks is one line, exit 2."""
    out = tmp_path / "run"

    def launch_then_stop(args, sig):
        log = tmp_path / "stdout.txt"
        with open(log, "w") as stdout:
            proc = subprocess.Popen([sys.executable, "-m", "pixformer", "launch", *args], stdout=stdout,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            deadline = time.time() + 120
            while log.read_text().count(" epoch ") < 2 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)                                 # both ranks are stepping: two epochs done
            os.killpg(proc.pid, sig)
            err = proc.communicate(timeout=120)[1]
        return proc.returncode, err, log.read_text()

    code, err, _ = launch_then_stop(["--nproc-per-node", "2", *LAUNCH_TRAIN, "--out", str(out)], signal.SIGTERM)
    assert code == 143 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pixformer: stopped (SIGTERM) at step ")
    again = err.split("Continue with: ")[1].strip()
    assert again == f"pixformer launch --nproc-per-node 2 train --out {out} --resume"
    stopped = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    code, err, printed = launch_then_stop(again.split()[2:], signal.SIGINT)      # without the leading "pixformer launch"
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"resuming {out} at step {stopped}/" in printed
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] > stopped
    done = subprocess.run([sys.executable, "-m", "pixformer", "launch", "--nproc-per-node", "2", "train", "--model",
                           "nonsense", "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "pixformer: error: unknown model name 'nonsense'; see " \
                                                            "`pixformer models`", done.stderr


def test_each_data_parallel_rank_drops_its_own_blocks():
    """Dropout and drop-path masks come from torch's generator, seeded each step: per data-parallel rank
    (its own rows), else row i of every rank would drop the same blocks; rank 0's seed is one process's."""
    from pixformer.engine.loop import dropout_seed, step_seed
    model = create_model("vit-n/2", img_size=8, num_classes=10, depth=4, dim=16, heads=2, drop_path=0.5).train()
    torch.nn.init.normal_(model.head.weight)                   # (zero at first: every output the same)
    x = torch.rand(2, 3, 8, 8)

    def out(data_rank):
        torch.manual_seed(dropout_seed(0, 5, data_rank))
        return model(x)
    assert dropout_seed(0, 5, 0) == step_seed(0, 5) and torch.equal(out(1), out(1))
    assert not torch.equal(out(0), out(1))
