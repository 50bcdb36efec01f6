"""benchmarks/gpu.sh --dry-run: every part of the GPU suite runs end to end on the CPU at tiny sizes and
lands in one JSON file, each part with its figures or the reason it has none."""
import json
import os
import subprocess
import sys
from pathlib import Path

from pixformer.engine.perf import native_bf16

ROOT = Path(__file__).resolve().parents[1]
STEPS = [f"step/{m}/{mode}" for mode in ("eager", "compile", "plain") for m in ("pit-t", "vit-t/2", "pit-s")]
TIMM = [f"timm/p{p}/{mode}" for mode in ("eager", "compile") for p in (1, 2)]
TASKS = {"mae": "transformers", "dit-p2": "diffusers", "dit-p1": "diffusers"}
PARTS = {"env", *STEPS, *TIMM, "packed/eager", "packed/compile", "train/pit-t", "train/vit-t/2",
         *(f"task/{t}/{impl}" for t, peer in TASKS.items() for impl in ("pixformer", peer))}


def test_the_gpu_suite_runs_every_part_on_cpu_in_a_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--jobs", "2"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and set(r["parts"]) == PARTS
    parts = r["parts"]
    for name, p in parts.items():
        assert p["status"] in ("ok", "skipped"), (name, p)
        assert p["status"] == "ok" or p["reason"], name           # a skipped part says why
    env = parts["env"]
    assert env["status"] == "ok" and env["measured_bf16_flop_s"] > 0 and env["datasheet_bf16_flop_s"] is None
    assert env["measured_flop_s"]["fp32"] > 0 and env["measured_flop_s"]["bf16"] == env["measured_bf16_flop_s"]
    for name in STEPS + ["packed/eager", "packed/compile"]:
        p = parts[name]
        assert p["status"] == "ok", (name, p)
        assert p["images_s"] > 0 and p["flop_s"] > 0 and p["peak_mem_gib"] > 0
        assert p["mfu_measured_gemm"] == p["flop_s"] / env["measured_bf16_flop_s"]   # these autocast to bf16
        assert p["mfu_datasheet"] is None and p["mfu_datasheet_missing"]   # no datasheet figure for a CPU
    # pit-t, one block, 8x8 pixels, 10 classes: 64 tokens + the class token (65), width 192, MLP 768
    embed, block, head = 2 * 64 * 3 * 192, 2 * 65 * 192 * (4 * 192 + 2 * 768) + 4 * 65 * 65 * 192, 2 * 192 * 10
    pit = parts["step/pit-t/eager"]
    assert pit["forward_flops_per_image"] == embed + block + head == 60_830_208
    assert pit["flops_per_step"] == 3 * 60_830_208 * 2                  # forward + backward, a batch of 2
    assert parts["step/pit-t/plain"]["selective_checkpoint"] is False
    assert parts["step/pit-t/compile"]["compile_backend"] == "eager"
    packed = parts["packed/compile"]
    assert packed["frames_compiled_first_step"] > 0 and packed["recompiles"] >= 0   # dynamo traced the blocks
    assert len(packed["frames_compiled_per_step"]) == packed["steps"] == 3
    for name in ("train/pit-t", "train/vit-t/2"):
        t = parts[name]
        assert t["status"] == "ok", (name, t)
        assert t["exit_code"] == 143 and t["sigterm_after_s"] is not None   # stopped by SIGTERM, checkpointed
        assert t["steps"] >= 1 and t["images_seen"] == t["steps"] * 4
        assert 0 <= t["val_top1"] <= 1 and t["val"]["n"] > 0
    for name in TIMM:                                  # ok where timm imports; else the reason
        assert parts[name]["status"] == "ok" or "timm" in parts[name]["reason"]
    precision = "bfloat16" if native_bf16("cpu") else "float32"   # a GPU's is bf16; a CPU emulating it: fp32
    for task, peer in TASKS.items():                   # the MAE and DiT steps against their peers, both alike
        ours, theirs = parts[f"task/{task}/pixformer"], parts[f"task/{task}/{peer}"]
        assert ours["status"] == theirs["status"] == "ok", (task, ours, theirs)
        assert ours["precision"] == theirs["precision"] == precision and ours["dims"]["depth"] == 1
        assert ours["flops_per_step"] == theirs["flops_per_step"] == 3 * ours["forward_flops_per_image"] * 2
        assert ours["peer"] == peer and ours["speed_vs_peer"] == ours["images_s"] / theirs["images_s"]
        assert ours["memory_vs_peer"] == ours["peak_mem_gib"] / theirs["peak_mem_gib"]
        peak = env["measured_flop_s"]["bf16" if precision == "bfloat16" else "fp32"]   # the dtype it ran
        assert ours["mfu_measured_gemm"] == ours["flop_s"] / peak and theirs["mfu_measured_gemm"] == theirs["flop_s"] / peak
