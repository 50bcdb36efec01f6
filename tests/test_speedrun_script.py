"""scripts/speedrun_cifar10.py on a tiny archive of class folders: the recipe and a --variant each train
once (a subprocess each), their held-out top-1 and wall time land in results.json and a table, and a
finished run is read back, not trained again; no run, finished or stopped, is ever deleted."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_speedrun_trains_the_recipe_and_each_variant_once(tmp_path):
    archive = tmp_path / "tiny.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(archive, "w") as tar:
        for c in ("cat", "dog"):
            for i in range(20):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{c}/{i}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    config = tmp_path / "tiny.yaml"
    config.write_text("model: vit-d1w16/4\nimg_size: 8\nbatch_size: 8\nepochs: 1\nprecision: fp32\neval_flip: true\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "speedrun_cifar10.py"), "--config", str(config), "--data",
           str(archive), "--out", str(tmp_path / "out"), "--options", "--lr 0.01",
           "--variant", "Muon=--optimizer muon"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"tiny/recipe", "tiny/Muon"}
    for r in results.values():
        assert 0 <= r["top1"] <= 100 and 0 <= r["top1_without_flip"] <= 100 and r["epochs"] == 1
        assert "--lr 0.01" in r["command"]
    assert "--optimizer muon" in results["tiny/Muon"]["command"]
    assert "| Muon |" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)      # read back, not trained
    assert again.returncode == 0 and json.loads((tmp_path / "out" / "results.json").read_text()) == results
    other = subprocess.run([*cmd[:-4], "--options", "--lr 0.02"], capture_output=True, text=True, timeout=600)
    assert other.returncode == 1 and "holds a finished run of another command" in other.stderr   # never deleted
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert (tmp_path / "out" / "tiny" / "recipe" / "speedrun.json").exists()
    for bad in ("=--lr 0.1", "recipe=--lr 0.1", "Muon!=--lr 0.1"):      # empty, taken, the same folder
        refused = subprocess.run([*cmd, "--variant", bad], capture_output=True, text=True, timeout=600)
        assert refused.returncode == 1 and "--variant" in refused.stderr and "Traceback" not in refused.stderr
    stopped = tmp_path / "stopped" / "tiny" / "recipe"                           # a stopped run: kept, not retrained
    stopped.mkdir(parents=True)
    (stopped / "metrics.jsonl").write_text('{"step": 1}\n')
    refused = subprocess.run([*cmd[:cmd.index("--out") + 1], str(tmp_path / "stopped"), *cmd[cmd.index("--out") + 2:]],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "holds a stopped run: continue it with pixformer train --out" in refused.stderr
    assert (stopped / "metrics.jsonl").read_text() == '{"step": 1}\n'
