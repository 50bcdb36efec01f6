"""The GPU suite: pixformer's training step against timm's ViT, packed training with FlexAttention,
two 2-minute CIFAR-10 runs, and the MAE and DiT steps against transformers' and diffusers' on one CUDA
GPU, each measurement in its own process, into one JSON file.

    bash benchmarks/gpu.sh --out gpu.json                  # on a CUDA machine: at most --budget s (690)
    bash benchmarks/gpu.sh --dry-run --out /tmp/gpu.json    # any CPU: every part at tiny sizes (~1 min)

gpu.sh installs the wheels in .device/wheels (if any), puts src/ on PYTHONPATH and runs this file.
The parts, in this order (a part starts only when the budget left covers what it needs; one that
cannot start, fails or runs out of time is recorded with its reason, and the rest still runs):

  env                       torch, the GPU and its bf16 dense peak (PEAK_BF16, NVIDIA's datasheets), a
                            bf16 GEMM measured here (the best n x n torch.mm, n = 4096, 8192), timm
  step/MODEL/eager          the classify training step (forward, cross-entropy, backward, clipping at
                            1.0, AdamW) of pit-t and vit-t/2 at 32x32 (batch 256) and pit-s at 64x64
                            (batch 64) on random images, bf16 autocast, attention through SDPA held to
                            its flash kernel, selective checkpointing as `pixformer train` decides it
                            (--selective)
  timm/pN/eager             timm's vit_tiny_patch16_224 at patch N (1: pit-t's peer, 2: vit-t/2's),
                            32x32, 10 classes: the same dimensions and step
  packed/eager              native-resolution training of vit-t/2 (random images, longer side drawn
                            from [32, 128], packed into sequences of 8,192 tokens, 64 images a step,
                            30 steps of differing packs), attention through FlexAttention; images/s and
                            the frames dynamo compiled on the first step and after it (recompiles)
  train/MODEL               `pixformer train` of pit-t and vit-t/2 on CIFAR-10 (--data), batch 256,
                            stopped by SIGTERM after --train-seconds (120) of wall time (start-up and
                            decoding the archive included), then `pixformer eval` of its checkpoint on
                            the validation split: images seen, training images/s, val top-1
  step/MODEL/compile        the step with `--compile` (each block through torch.compile)
  step/MODEL/plain          the eager step without selective checkpointing
  packed/compile            packed training with compiled blocks
  timm/pN/compile           timm's blocks through torch.compile
  task/mae/IMPL             one MAE pretraining step (benchmarks/mae_step.py: PiT-T 32x32, 75 % of the pixel
                            tokens hidden, batch 256) of pixformer as `pixformer train --task mae` runs it and of
                            transformers' ViTMAEForPreTraining (SDPA), both bf16 autocast; pixformer's entry gets
                            the ratios of images/s and peak memory to its peer's
  task/dit-pP/IMPL          one DiT-S training step (benchmarks/dit_step.py: 32x32x4 latents, 1,000 classes) at
                            patch 2 (batch 256) and patch 1 (batch 64) of pixformer and of diffusers'
                            DiTTransformer2DModel, both bf16 autocast. Both need diffusers (pixformer's DiT draws
                            its noise schedule from it), which the GPU image lacks: put its wheel in
                            .device/wheels (see gpu.sh). (A dry run on a CPU that emulates bf16 runs both
                            task parts' models in fp32, as pixformer's default does there.)

Every step figure: images/s (median step), the step's matmul FLOPs (3x pixformer's forward count,
VisionTransformer.flops: the same for timm's ViT at identical dimensions) per second, and their
share (MFU) of the device's dense peak in the dtype the step ran (bf16 on a GPU) two ways: NVIDIA's
datasheet figure for the device (mfu_datasheet, bf16) and the GEMM measured in the same run in that
dtype (mfu_measured_gemm); the peak GPU memory the
step allocated (torch.cuda.max_memory_allocated; on CPU, the process's peak RSS). The JSON is written
again after every part, so a run cut short keeps what it measured.

--dry-run runs every part on the CPU at tiny sizes (one block, 8x8 images, a batch of 2, one or two
steps, a tiny CIFAR-like archive made on the spot, torch.compile with the "eager" backend so that
dynamo traces but nothing is built): a test of the plumbing, whose figures mean nothing; there
--jobs 2 runs two parts at once.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from harness import dtype_key

ROOT = Path(__file__).resolve().parents[1]
CIFAR = "cifar10-train-jpg.tar.gz"
DATA_CANDIDATES = (ROOT / ".device/data" / CIFAR, ROOT.parent / "shared/data" / CIFAR)

# bf16 dense tensor-core peak (no sparsity) from NVIDIA's datasheets, matched in this order against
# torch.cuda.get_device_name() (GH200 before H200, NVL / PCIe before the SXM part, L40S before L4).
PEAK_BF16 = (("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12),
             ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
             ("L4", 121e12))

FULL = dict(device="cuda", steps=20, warmup=3, model_args={}, gemm_sizes=None, gemm_reps=10, compile_backend="inductor",
            step_models={"pit-t": (32, 256), "vit-t/2": (32, 256), "pit-s": (64, 64)},
            timm_peers={1: "pit-t", 2: "vit-t/2"},
            packed=dict(model="vit-t/2", images=64, source_sides=(48, 192), resolution_range=(32, 128), max_side=128,
                        pack_length=8192, steps=30),
            train=dict(models=("pit-t", "vit-t/2"), batch=256, epochs=1000, wait_for_checkpoint=False),
            tasks={"mae": dict(batch=256, dims={}), "dit-p2": dict(batch=256, dims={}),
                   "dit-p1": dict(batch=64, dims={})})
DRY = dict(device="cpu", steps=1, warmup=1, model_args={"depth": 1}, gemm_sizes=(256,), gemm_reps=2, compile_backend="eager",
           step_models={"pit-t": (8, 2), "vit-t/2": (8, 2), "pit-s": (8, 2)},
           timm_peers={1: "pit-t", 2: "vit-t/2"},
           packed=dict(model="vit-t/2", images=6, source_sides=(8, 24), resolution_range=(4, 16), max_side=16,
                       pack_length=128, steps=3),
           train=dict(models=("pit-t", "vit-t/2"), batch=4, epochs=1000, wait_for_checkpoint=True),
           tasks={"mae": dict(batch=2, dims={"img": 8, "depth": 1, "dec_depth": 1}),
                  "dit-p2": dict(batch=2, dims={"img": 8, "depth": 1}),
                  "dit-p1": dict(batch=2, dims={"img": 8, "depth": 1})})
# the other tasks' steps (benchmarks/mae_step.py, dit_step.py) and their peers'
TASK_PEERS = {"mae": "transformers", "dit-p2": "diffusers", "dit-p1": "diffusers"}


# ---- the parts --------------------------------------------------------------------------------------
def parts(a) -> list[dict]:
    """The suite's parts in running order: name, worker kind, job, seconds needed to start, cap."""
    s = DRY if a.dry_run else FULL
    common = dict(device=s["device"], steps=s["steps"], warmup=s["warmup"], model_args=s["model_args"],
                  compile_backend=s["compile_backend"])

    def step(model, mode):
        img, batch = s["step_models"][model]
        return dict(name=f"step/{model}/{mode}", kind="step", need=90 if mode == "compile" else 30,
                    cap=300 if mode == "compile" else 150,
                    job=dict(common, impl="pixformer", model=model, img=img, batch=batch, compile=mode == "compile",
                             selective="off" if mode == "plain" else a.selective))

    def peer(patch, mode):
        model = s["timm_peers"][patch]
        img, batch = s["step_models"][model]
        return dict(name=f"timm/p{patch}/{mode}", kind="step", need=90 if mode == "compile" else 30,
                    cap=300 if mode == "compile" else 150,
                    job=dict(common, impl="timm", model=model, patch=patch, img=img, batch=batch,
                             compile=mode == "compile", selective="off"))

    def packed(mode):
        return dict(name=f"packed/{mode}", kind="packed", need=60, cap=300,
                    job=dict(common, **s["packed"], compile=mode == "compile"))

    def train(model):
        t = s["train"]
        return dict(name=f"train/{model}", kind="train", need=a.train_seconds + 40, cap=a.train_seconds + 240,
                    job=dict(device=s["device"], model=model, batch=t["batch"], epochs=t["epochs"],
                             seconds=a.train_seconds, wait_for_checkpoint=t["wait_for_checkpoint"],
                             model_args=s["model_args"], data=a.data, work=str(Path(a.work) / "runs")))

    def task(name, impl):
        return dict(name=f"task/{name}/{impl}", kind="task", need=45, cap=240,
                    job=dict(device=s["device"], steps=s["steps"], warmup=s["warmup"], task=name, impl=impl,
                             config=impl if impl == "pixformer" else f"{impl}-bf16", **s["tasks"][name]))

    models = list(s["step_models"])
    out = [dict(name="env", kind="env", need=0, cap=180,
                job=dict(device=s["device"], gemm_sizes=s["gemm_sizes"], gemm_reps=s["gemm_reps"]))]
    out += [step(m, "eager") for m in models] + [peer(p, "eager") for p in s["timm_peers"]] + [packed("eager")]
    out += [train(m) for m in s["train"]["models"]]                 # a fixed cost: before the compilers' open-ended one
    out += [step(m, "compile") for m in models] + [step(m, "plain") for m in models]
    out += [packed("compile")] + [peer(p, "compile") for p in s["timm_peers"]]
    out += [task(t, impl) for t in s["tasks"] for impl in ("pixformer", TASK_PEERS[t])]
    return [p for p in out if not a.parts or p["name"] == "env" or any(fnmatch.fnmatch(p["name"], g) for g in a.parts)]


# ---- workers: each runs in its own process and prints one JSON object as its last line ---------------
def env_worker(job: dict) -> dict:
    import torch

    from harness import matmul_peaks, peak_per_dtype
    dev = torch.device(job["device"])
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device_kind": dev.type}
    for lib in ("timm", "transformers", "diffusers"):   # the peers (and DiT's noise schedules: diffusers)
        try:
            info[lib] = importlib.import_module(lib).__version__
        except Exception as e:                      # absent, or timm's torchvision does not import
            info[f"{lib}_missing"] = f"{lib} does not import: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return {**info, "no_cuda": "torch.cuda.is_available() is False: no CUDA GPU here (--dry-run runs the "
                                       "suite on CPU at tiny sizes)"}
        props = torch.cuda.get_device_properties(dev)
        name = torch.cuda.get_device_name(dev)
        entry = next(((k, v) for k, v in PEAK_BF16 if k in name), None)
        info.update(device=name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2 ** 30,
                    sms=props.multi_processor_count,
                    flash_attention=bool(getattr(torch.backends.cuda, "is_flash_attention_available", lambda: None)()),
                    datasheet_bf16_flop_s=entry[1] if entry else None, datasheet_entry=entry[0] if entry else None)
        if entry is None:
            info["datasheet_missing"] = f"no datasheet figure for {name!r} in gpu_suite.PEAK_BF16"
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"not run: {e}"
    else:
        info.update(device=platform.processor() or platform.machine(), datasheet_bf16_flop_s=None,
                    datasheet_missing="a CPU: no datasheet figure (the measured GEMM is the denominator)")
    by_lib = matmul_peaks(job["device"], tuple(job["gemm_sizes"]) if job["gemm_sizes"] else None, job["gemm_reps"])
    info["gemm_flop_s_by_library"] = by_lib
    info["measured_flop_s"] = peak_per_dtype(by_lib)       # per dtype: a CPU's fp32 too (a GPU: bf16 only)
    info["measured_bf16_flop_s"] = info["measured_flop_s"]["bf16"]
    return info


def step_worker(job: dict) -> dict:
    """One classify training step, timed on random images (what a step costs, without data loading)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from harness import device_timing, time_steps, timed, train_step
    from pixformer import Speed, create_model
    from pixformer.engine.optim import adamw, param_groups
    from pixformer.engine.perf import apply_compile, apply_speed_settings, checkpointed_blocks
    from pixformer.engine.plan import selective_above, selective_pays

    dev, img, batch = torch.device(job["device"]), job["img"], job["batch"]
    torch.manual_seed(0)
    ours = create_model(job["model"], img_size=img, num_classes=10, **job["model_args"])
    fwd = ours.flops()                                     # timm's peer has the same dimensions: one count
    row = {"model": job["model"], "impl": job["impl"], "img": img, "batch": batch, "precision": "bf16",
           "attention": "SDPA, flash kernel only",
           "compile": job["compile"], "compile_backend": job["compile_backend"] if job["compile"] else None}
    if job["impl"] == "timm":
        import timm
        del ours
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=job["patch"],
                                  num_classes=10, **job["model_args"]).to(dev)
        if job["compile"]:
            for block in model.blocks:                     # block by block, as pixformer's --compile
                block.compile(backend=job["compile_backend"])
        groups = model.parameters()
        row.update(timm_model=f"vit_tiny_patch16_224 (patch {job['patch']})", selective_checkpoint=False)
    else:
        model = ours.to(dev)
        selective = (selective_pays(job["model"], img, batch, "bf16", "sdpa", 10, 3, selective_above(dev),
                                    **job["model_args"])
                     if job["selective"] == "auto" else job["selective"] == "on")
        # "sdpa" (what "auto" runs on GPUs), held to the flash kernel below: the "flash" backend's fallback
        # (a try and a warnings filter) splits each compiled block into 4 graphs
        apply_speed_settings(model, Speed(attn_backend="sdpa", selective_checkpoint=selective, onednn_linear=False))
        if job["compile"]:
            apply_compile(model, job["compile_backend"])
        groups = param_groups(model, 0.05)
        row.update(selective_checkpoint=bool(checkpointed_blocks(model)["selective"]))
    model.train()
    opt = adamw(groups, lr=1e-4)     # as `pixformer train` builds it
    x = torch.randn(batch, 3, img, img, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    one = train_step(lambda i: F.cross_entropy(model(x).float(), y), opt, torch.bfloat16, dev.type, clip=1.0)

    def step(i):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):      # both models call SDPA: held to its flash kernel
            return one(i)
    sync, reset, peak, peak_kind = device_timing(dev)
    warm = [timed(lambda: step(i), sync) for i in range(job["warmup"])]   # the first steps compile
    reset()
    t = time_steps(step, job["steps"], warmup=0, sync=sync)
    flops = 3 * fwd * batch                                 # backward: two products per forward one
    return {**row, "images_s": batch / t["step_s"], "step_s": t["step_s"], "step_times": t["step_times"],
            "warmup_s": warm, "forward_flops_per_image": fwd, "flops_per_step": flops, "flop_s": flops / t["step_s"],
            "peak_mem_gib": peak(), "peak_mem": peak_kind,
            "params": sum(p.numel() for p in model.parameters())}


def packed_worker(job: dict) -> dict:
    """Native-resolution training steps over differing packs, attention through FlexAttention; the frames
    dynamo compiles on the first step and on each later one (recompiles)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from harness import device_timing, timed, train_step
    from pixformer import Speed, create_model
    from pixformer.data.augment import normalize
    from pixformer.data.native import batcher_for
    from pixformer.models import token_layout
    from pixformer.engine.optim import adamw, param_groups
    from pixformer.engine.perf import apply_compile, apply_speed_settings

    torch._logging.set_logs(recompiles=True)               # each recompile's reason on stderr (kept in the JSON)
    dev = torch.device(job["device"])
    torch.manual_seed(0)
    settings = {"max_side": job["max_side"], "pack_length": job["pack_length"],
                "resolution_range": list(job["resolution_range"])}
    model = create_model(job["model"], img_size=job["max_side"], num_classes=10, **job["model_args"]).to(dev)
    apply_speed_settings(model, Speed(attn_backend="flex", selective_checkpoint=False, onednn_linear=False))
    if job["compile"]:
        apply_compile(model, job["compile_backend"])
    batcher = batcher_for(settings, *token_layout(model), dev, job["compile"])
    p = model.cfg.patch_size
    norm = lambda im: normalize(im, [0.5] * 3, [0.25] * 3)                       # noqa: E731
    steps, lo, hi = job["steps"], *job["source_sides"]
    packs, ys, flops, images = [], [], [], []
    for s in range(steps):                                 # every pack made before timing: the GPU's work alone
        rng = np.random.default_rng([0, s])
        imgs = [torch.from_numpy(rng.integers(0, 256, (3, *rng.integers(lo, hi + 1, 2)), dtype=np.uint8))
                for _ in range(job["images"])]
        packed = batcher(imgs, norm, g=torch.Generator().manual_seed(s), train=True)
        seg, grid = packed.segments.view(-1), packed.grids.view(-1, 2)
        grids = [grid[(seg == i).nonzero()[0, 0]].int().tolist() for i in range(packed.n_images)]   # each image's
        flops.append(3 * sum(model.flops((gh * p, gw * p)) for gh, gw in grids))   # forward + backward (2x)
        images.append(packed.n_images)
        packs.append(packed.to(dev))
        ys.append(torch.from_numpy(rng.integers(0, 10, packed.n_images)).to(dev))
    opt = adamw(param_groups(model, 0.05), lr=1e-4)
    one = train_step(lambda i: F.cross_entropy(model(packs[i]).float(), ys[i]), opt, torch.bfloat16, dev.type, clip=1.0)
    sync, reset, peak, peak_kind = device_timing(dev)
    compiled, times = [], []
    for i in range(steps):
        before = counters["frames"]["ok"]
        times.append(timed(lambda: one(i), sync))
        compiled.append(counters["frames"]["ok"] - before)
        if i == 0:
            reset()
    timed_s = sum(times[1:])                               # the first step compiles: left out
    return {"model": job["model"], "precision": "bf16", "attention": "flex", "compile": job["compile"],
            "compile_backend": job["compile_backend"] if job["compile"] else None, "steps": steps,
            "images_per_step": images, "packs_per_step": [int(t.segments.shape[0]) for t in packs],
            "pack_length": job["pack_length"], "images_s": sum(images[1:]) / timed_s, "step_times": times,
            "flop_s": sum(flops[1:]) / timed_s, "flops_per_step": flops,
            "frames_compiled_first_step": compiled[0], "recompiles": sum(compiled[1:]), "frames_compiled_per_step": compiled,
            "unique_graphs": counters["stats"]["unique_graphs"], "peak_mem_gib": peak(), "peak_mem": peak_kind}


def task_worker(job: dict) -> dict:
    """One training step of the MAE or DiT task (benchmarks/mae_step.py, dit_step.py at their full sizes),
    pixformer's as `pixformer train` runs it or its peer's as published under bf16 autocast."""
    import torch

    from harness import device_timing, time_steps, timed

    from pixformer.engine.perf import native_bf16
    dev = torch.device(job["device"])
    config = job["config"]
    if job["impl"] != "pixformer" and not native_bf16(dev):    # pixformer's auto is fp32 there: the peer's too
        config = job["impl"]
    if job["task"] == "mae":
        import mae_step
        step, model, amp = mae_step.build(config, job["batch"], job["device"], job["dims"])
        fwd, dims = mae_step.mae_flops(job["dims"]), {**mae_step.DIMS, **job["dims"]}
    else:
        import dit_step
        patch = int(job["task"].removeprefix("dit-p"))
        step, model, amp, flops_of = dit_step.build(config, patch, job["batch"], job["device"], job["dims"])
        fwd = flops_of()
        dims = {**dit_step.DIMS, **job["dims"], "patch": patch}
    sync, reset, peak, peak_kind = device_timing(dev)
    warm = [timed(lambda: step(i), sync) for i in range(job["warmup"])]
    reset()
    t = time_steps(step, job["steps"], warmup=0, sync=sync)
    flops = 3 * fwd * job["batch"]                           # forward + backward (2x), one forward an image
    return {"task": job["task"], "impl": job["impl"], "config": config, "dims": dims, "batch": job["batch"],
            "precision": str(amp or torch.float32)[6:], "images_s": job["batch"] / t["step_s"], "step_s": t["step_s"],
            "step_times": t["step_times"], "warmup_s": warm, "forward_flops_per_image": fwd, "flops_per_step": flops,
            "flop_s": flops / t["step_s"], "peak_mem_gib": peak(), "peak_mem": peak_kind,
            "params": sum(p.numel() for p in model.parameters())}


def train_worker(job: dict) -> dict:
    """`pixformer train` stopped by SIGTERM after `seconds` of wall time, then `pixformer eval` of its
    checkpoint on the validation split."""
    from pixformer.engine.checkpoint import find_checkpoint, read_state

    run = Path(job["work"]) / job["model"].replace("/", "")
    cmd = [sys.executable, "-m", "pixformer", "train", "--model", job["model"], "--data", job["data"],
           "--epochs", str(job["epochs"]), "--batch-size", str(job["batch"]), "--device", job["device"],
           "--out", str(run), "--progress", "false", "--tensorboard", "false"]
    cmd += [a for k, v in job["model_args"].items() for a in (f"--{k.replace('_', '-')}", str(v))]
    if job["wait_for_checkpoint"]:
        cmd += ["--checkpoint-every", "1"]
    log = run.parent / f"{run.name}.train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, stopped_at = time.monotonic(), None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:                         # `timeout -s TERM SECONDS`, optionally after a checkpoint
            elapsed = time.monotonic() - t0
            ready = not job["wait_for_checkpoint"] or (run / "checkpoint" / "state.json").exists()
            if stopped_at is None and elapsed >= job["seconds"] and ready:
                proc.send_signal(signal.SIGTERM)           # stops at the next step, with its checkpoint (exit 143)
                stopped_at = elapsed
            time.sleep(0.2)
    wall = time.monotonic() - t0
    tail = log.read_text().strip().splitlines()[-3:]
    row = {"model": job["model"], "command": " ".join(cmd[1:]), "exit_code": proc.returncode, "wall_s": wall,
           "sigterm_after_s": stopped_at, "log_tail": tail}
    ckpt = find_checkpoint(run)
    if ckpt is None:
        raise RuntimeError(f"pixformer train left no checkpoint (exit code {proc.returncode}): {' | '.join(tail)}")
    state = read_state(ckpt)
    batch = state["train_config"]["batch_size"]
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    epochs = [m for m in metrics if "img_per_s" in m]
    t1 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pixformer", "eval", "--checkpoint", str(run), "--split", "val",
                           "--json", "true", "--device", job["device"]], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pixformer eval failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    val = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, "steps": state["step"], "batch": batch, "images_seen": state["step"] * batch,
            "images_seen_per_wall_s": state["step"] * batch / wall,            # start-up included
            "epochs_completed": len(epochs), "train_images_s_last_epoch": epochs[-1]["img_per_s"] if epochs else None,
            "val_top1_last_epoch": epochs[-1].get("val_top1") if epochs else None,
            "val_top1": val.get("top1"), "val": val, "eval_s": time.monotonic() - t1}


WORKERS = {"env": env_worker, "step": step_worker, "packed": packed_worker, "train": train_worker, "task": task_worker}


# ---- the run ----------------------------------------------------------------------------------------
def run_part(part: dict, timeout: float, logs: Path) -> dict:
    """The part's worker in its own process (and process group, so a child it started goes with it on a
    timeout); its JSON, or a status and the reason."""
    name = part["name"].replace("/", "_")
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    t0 = time.monotonic()
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", part["kind"], "--job", json.dumps(part["job"])],
                                stdout=o, stderr=e, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "reason": f"ran past its {timeout:.0f} s (its cap, or the budget left)",
                    "seconds": time.monotonic() - t0}
    seconds = time.monotonic() - t0
    lines, errors = out.read_text().strip().splitlines(), err.read_text().strip().splitlines()
    recompiles = [l.strip() for l in errors if "__recompiles" in l][:12]
    notices = sorted({l.strip() for l in errors if l.startswith("pixformer:")})   # e.g. a kernel's fallback
    if proc.returncode or not lines:
        last = next((l for l in reversed(errors) if l.strip()), f"exit code {proc.returncode}")
        return {"status": "failed", "reason": last.strip()[:400], "stderr_tail": errors[-8:], "seconds": seconds}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"status": "failed", "reason": f"no JSON on the worker's last line: {lines[-1][:200]}", "seconds": seconds}
    return {"status": "ok", **result, **({"recompile_log": recompiles} if recompiles else {}),
            **({"notices": notices} if notices else {}), "seconds": seconds}


def add_mfu(result: dict, env: dict) -> None:
    """The share of the device's dense peak in the dtype the step ran that its matmul FLOP/s reached:
    against the datasheet (bf16 only) and against the GEMM measured in this run in that dtype (None,
    with the reason, where a denominator is missing)."""
    if result.get("status") != "ok" or "flop_s" not in result:
        return
    dtype = dtype_key(result.get("precision", "bf16"))
    sheet = env.get("datasheet_bf16_flop_s") if dtype == "bf16" else None
    gemm = (env.get("measured_flop_s") or {}).get(dtype)
    result["mfu_datasheet"] = result["flop_s"] / sheet if sheet else None
    result["mfu_measured_gemm"] = result["flop_s"] / gemm if gemm else None
    if not sheet:
        result["mfu_datasheet_missing"] = (f"the step ran in {dtype}; the datasheet figure is bf16's" if dtype != "bf16"
                                           else env.get("datasheet_missing") or env.get("reason") or "env did not run")


def libraries(part: dict) -> set[str]:
    """The libraries a part imports besides torch and pixformer."""
    job = part["job"]
    if job.get("impl") == "timm":
        return {"timm"}
    if part["kind"] != "task":
        return set()
    return ({"diffusers"} if job["task"].startswith("dit") else set()) | ({job["impl"]} - {"pixformer"})


def skip_reason(part: dict, env: dict, left: float) -> str | None:
    """Why `part` cannot start now, or None."""
    if part["kind"] != "env":
        if env.get("status") != "ok":
            return f"env did not complete: {env.get('reason', '')}"
        if env.get("no_cuda"):
            return env["no_cuda"]
    for lib in libraries(part):
        if env.get(f"{lib}_missing"):
            return env[f"{lib}_missing"]
    data = part["job"].get("data")
    if part["kind"] == "train" and not (data and Path(data).is_file()):
        return (f"no CIFAR-10 archive at {data}" if data else
                f"no CIFAR-10 archive: give --data (looked for {', '.join(str(p) for p in DATA_CANDIDATES)})")
    if left < part["need"]:
        return f"time budget: {left:.0f} s left, the part needs about {part['need']} s"
    return None


def compare_to_peers(parts: dict) -> list[str]:
    """pixformer's task steps against their peer's where both are done (in one precision), on pixformer's entry:
    the images/s and peak memory ratios; a line for each comparison made now."""
    lines = []
    for task, peer in TASK_PEERS.items():
        ours, theirs = parts.get(f"task/{task}/pixformer", {}), parts.get(f"task/{task}/{peer}", {})
        if ours.get("status") == theirs.get("status") == "ok" and "speed_vs_peer" not in ours \
                and ours["precision"] == theirs["precision"]:                # a ratio in one precision only
            ours.update(peer=peer, speed_vs_peer=ours["images_s"] / theirs["images_s"],
                        memory_vs_peer=ours["peak_mem_gib"] / theirs["peak_mem_gib"])
            lines.append(f"{'task/' + task:<24} pixformer {ours['speed_vs_peer']:.2f}x the images/s of {peer} at "
                         f"{ours['memory_vs_peer']:.2f}x its peak memory (both {dtype_key(ours['precision'])})")
    return lines


def tiny_archive(folder: Path) -> str:
    """A CIFAR-10-like archive for --dry-run: train/CLASS/NNNN.jpg, 3 classes x 12 random 8x8 images."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    path = folder / "tiny-train-jpg.tar.gz"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for c in ("cat", "dog", "frog"):
            for i in range(12):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
                info = tarfile.TarInfo(f"train/{c}/{i:04d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return str(path)


def write(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def summary(name: str, r: dict) -> str:
    if r["status"] != "ok":
        return f"{name:<24} {r['status'].upper()}: {r.get('reason', '')}"
    if name == "env":
        if r.get("no_cuda"):
            return f"{name:<24} {r['no_cuda']}"
        sheet = r.get("datasheet_bf16_flop_s")
        return (f"{name:<24} {r.get('device')}, torch {r['torch']}: bf16 GEMM {r['measured_bf16_flop_s'] / 1e12:.3f} "
                f"TFLOP/s measured; datasheet " + (f"{sheet / 1e12:.0f} TFLOP/s" if sheet else r["datasheet_missing"]))
    if "images_seen" in r:
        return (f"{name:<24} {r['images_seen']:,} images seen in {r['wall_s']:.0f} s, val top-1 "
                f"{r['val_top1']:.4f}")
    mfu = lambda k: "-" if r.get(k) is None else f"{r[k]:.1%}"                  # noqa: E731
    extra = f", recompiles {r['recompiles']}" if "recompiles" in r else ""
    return (f"{name:<24} {r['images_s']:10.1f} img/s  {r['flop_s'] / 1e12:7.2f} TFLOP/s  MFU {mfu('mfu_datasheet')} "
            f"(datasheet), {mfu('mfu_measured_gemm')} (measured GEMM)  peak {r['peak_mem_gib']:.2f} GiB{extra}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="the JSON file (default: $OUT/gpu.json when $OUT is set, else "
                                                 "benchmarks/results/gpu.json, or gpu-small.json with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes (a plumbing test)")
    ap.add_argument("--budget", type=float, default=690, help="seconds for the whole suite (parts past it are skipped)")
    ap.add_argument("--data", default=None, help=f"the CIFAR-10 training archive (default: .device/data/{CIFAR} or "
                                                  f"../shared/data/{CIFAR}, whichever exists)")
    ap.add_argument("--train-seconds", type=float, default=None, help="wall time of each training run before its "
                                                                      "SIGTERM (default 120; --dry-run: 0, i.e. at its first checkpoint)")
    ap.add_argument("--selective", choices=("auto", "on", "off"), default="auto",
                    help="selective checkpointing in the step parts: auto = as `pixformer train` decides it")
    ap.add_argument("--parts", nargs="+", default=None, help="only these parts (glob patterns, e.g. 'step/*/eager' "
                                                             "train/pit-t); env always runs")
    ap.add_argument("--work", default=None, help="logs and run folders (default: a new temporary folder)")
    ap.add_argument("--jobs", type=int, default=1, help="parts run at once; above 1 with --dry-run only (timings "
                                                         "need the machine to themselves)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(WORKERS[a.worker](json.loads(a.job))))
        return
    if a.jobs < 1 or (a.jobs > 1 and not a.dry_run):
        ap.error("--jobs: 1, or more with --dry-run (timings need the machine to themselves)")
    t_start = time.monotonic()
    default_out = "gpu-small.json" if a.dry_run else "gpu.json"
    out = Path(a.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else
                         ROOT / "benchmarks/results" / default_out))
    out.parent.mkdir(parents=True, exist_ok=True)
    a.work = a.work or tempfile.mkdtemp(prefix="pixformer-gpu-")
    logs = Path(a.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if a.train_seconds is None:
        a.train_seconds = 0 if a.dry_run else 120
    if a.dry_run and a.data is None:
        a.data = tiny_archive(Path(a.work))
    a.data = a.data or str(next((p for p in DATA_CANDIDATES if p.exists()), ""))
    record = {"suite": "pixformer GPU suite", "command": "bash benchmarks/gpu.sh " + " ".join(sys.argv[1:]),
              "dry_run": a.dry_run, "budget_s": a.budget, "data": a.data, "work": a.work,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    todo = parts(a)
    record["parts"] = {p["name"]: {"kind": p["kind"], "status": "pending"} for p in todo}   # a cut run shows these
    env: dict = {}

    def start(part: dict) -> dict:                     # when the part's turn comes: run it, or say why not
        left = a.budget - (time.monotonic() - t_start)
        why = skip_reason(part, env, left)
        if why:
            return {"status": "skipped", "reason": why}
        print(f"{part['name']} ...", flush=True)
        return run_part(part, min(part["cap"], left), logs)

    def finish(part: dict, result: dict) -> None:
        add_mfu(result, env)
        record["parts"][part["name"]] = {"kind": part["kind"], **result}
        compared = compare_to_peers(record["parts"])
        record["wall_s"] = time.monotonic() - t_start
        write(out, record)
        print("\n".join([summary(part["name"], result), *compared]), flush=True)

    env = start(todo[0])                               # every other part reads what env found
    finish(todo[0], env)
    with ThreadPoolExecutor(a.jobs) as pool:           # one at a time unless --jobs (dry runs)
        running = {pool.submit(start, part): part for part in todo[1:]}
        for done in as_completed(running):
            finish(running[done], done.result())
    print(f"{out} ({record['wall_s']:.0f} s; logs in {logs})")


if __name__ == "__main__":
    main()
