"""benchmarks/recipe_step.py builds a config's step as train does and times its variants; muon_step.py
times torch's Muon against the stacked one."""
import importlib.util
import subprocess
import sys
from pathlib import Path

from pixformer.engine.perf import native_bf16

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_step_times_each_variant_of_the_speedrun_config(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("recipe_step", ROOT / "benchmarks" / "recipe_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_variant("lean_mlp=false,attn_backend=math,checkpoint_blocks=2") == \
        {"lean_mlp": False, "attn_backend": "math", "checkpoint_blocks": 2}
    cfg = bench.load_config(str(ROOT / "configs" / "cifar10-speedrun.yaml"))
    assert cfg.optimizer == "muon" and cfg.speed.lean_mlp is False and cfg.model_args["stem"] == "conv"
    monkeypatch.setattr(sys, "argv", ["recipe_step.py", "--config", str(ROOT / "configs" / "cifar10-speedrun.yaml"),
                                      "--side", "16", "--variants", "", "lean_mlp=true", "accum_steps=4", "--rounds", "1"])
    bench.main()
    out = capsys.readouterr().out.splitlines()
    assert "batch 128" in out[0] and "optimizer muon" in out[0]
    assert out[1].startswith("(the config's own)") and "(1.000x)" in out[1] and out[2].startswith("lean_mlp=true")
    assert out[3].startswith("accum_steps=4")



def test_recipe_step_builds_a_config_without_an_image_size_at_the_side_given(monkeypatch, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("recipe_step", ROOT / "benchmarks" / "recipe_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = tmp_path / "sized_by_data.yaml"
    config.write_text("model: vit-n/4\ndata: cifar10\nbatch_size: 4\nprecision: fp32\n")
    monkeypatch.setattr(sys, "argv", ["recipe_step.py", "--config", str(config), "--side", "16", "--variants", "",
                                      "--rounds", "1"])
    bench.main()
    out = capsys.readouterr().out.splitlines()
    assert "at 16x16, batch 4" in out[0] and out[1].startswith("(the config's own)")


def test_muon_step_compares_torchs_muon_with_the_stacked_one(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("muon_step", ROOT / "benchmarks" / "muon_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["muon_step.py", "--model", "vit-n/4", "--rounds", "1"])
    bench.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("vit-n/4: 24 matrices of shapes [(128, 128), (128, 512), (384, 128), (512, 128)]")
    assert out[1].startswith("torch.optim.Muon") and out[2].startswith("StackedMuon (bf16)")
    assert out[2].endswith("largest parameter difference from torch's after 4 steps: 0")
    assert len(out) == (3 if native_bf16("cpu") else 4)          # and the fp32 iteration where bf16 is emulated


def test_muon_step_over_ranks_deals_the_iteration_out_under_fsdp_and_ddp():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "muon_step.py"), "--model", "vit-n/4",
                           "--ranks", "2", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = [line for line in done.stdout.splitlines() if line.strip()]
    assert out[-5].startswith("vit-n/4: 24 matrices over 2 processes")
    assert [line.split(" step ")[0].strip() for line in out[-4:]] == [
        "FSDP: dealt out over the ranks", "FSDP: all on rank 0", "DDP: dealt out over the ranks", "DDP: all on every rank"]
    assert out[-3].endswith("(1.00x)") and out[-1].endswith("(1.00x)")
