"""Patch-size conversion (FlexiViT's pseudo-inverse resize): identity at the same patch size, the
PI-resize property, a converted checkpoint that evaluates and starts runs, and its bad input."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from pixformer import TrainConfig, create_model, train
from pixformer.cli import main
from pixformer.models.flexi import pi_resize, resize_matrix


def test_the_same_patch_size_is_the_identity():
    w = torch.randn(16, 4 * 4 * 3)
    torch.testing.assert_close(pi_resize(w, 3, 4, 4), w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resize_matrix_is_the_resize_of_a_patch(mode):
    x = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    want = F.interpolate(x, size=(6, 6), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    torch.testing.assert_close((resize_matrix(3, 6, mode) @ x.reshape(5, 9).t()).t(), want.reshape(5, 36))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_converted_embedding_gives_an_upsampled_patch_the_original_token(mode):
    """<resize(x), w'> = <x, w>: a model converted from p to q (q >= p) embeds a patch resized to q
    exactly as the original embedded it; with nearest resizing that holds for whole upsampled images."""
    torch.manual_seed(0)
    model = create_model("vit-n/2", img_size=8, in_chans=3, depth=1, dim=16, heads=2)
    q = 4
    new = create_model("vit-n/4", img_size=8, in_chans=3, depth=1, dim=16, heads=2)
    with torch.no_grad():
        new.patch_embed.weight.copy_(pi_resize(model.patch_embed.weight, 3, 2, q, mode))
        new.patch_embed.bias.copy_(model.patch_embed.bias)
    x = torch.randn(2, 3, 8, 8)
    if mode == "nearest":       # the whole image upsampled: every patch is its own patch upsampled
        big = F.interpolate(x, scale_factor=2, mode="nearest")
        torch.testing.assert_close(new.patch_embed(new.patchify(big)[0]), model.patch_embed(model.patchify(x)[0]),
                                   atol=1e-5, rtol=1e-5)
    patches = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 2, 2)   # (B*16, 3, 2, 2)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(patches, size=(q, q), mode=mode, **kw)                                     # each patch resized
    tokens_new = new.patch_embed(up.permute(0, 2, 3, 1).reshape(len(up), -1))                  # (p1 p2 c) layout
    tokens_old = model.patch_embed(patches.permute(0, 2, 3, 1).reshape(len(patches), -1))
    torch.testing.assert_close(tokens_new, tokens_old, atol=1e-5, rtol=1e-5)


def test_convert_writes_a_checkpoint_that_evaluates_and_starts_runs(tmp_path, capsys):
    base = dict(model="vit-n/4", data="digits", model_args=dict(depth=1, dim=16, heads=2), epochs=1,
                train_subset=64, progress=False, ema_decay=0.9)
    train(TrainConfig(**base, out=str(tmp_path / "p4")))
    assert main(["convert", "--checkpoint", str(tmp_path / "p4"), "--patch-size", "1", "--out", str(tmp_path / "p1")]) == 0
    assert "pit-d1w16 (from patch 4)" in capsys.readouterr().out
    state = json.loads((tmp_path / "p1" / "checkpoint" / "state.json").read_text())
    assert state["model"]["config"]["patch_size"] == 1 and state["converted_from"]["patch_size"] == 4
    assert (tmp_path / "p1" / "checkpoint" / "ema.safetensors").exists()
    assert main(["eval", "--checkpoint", str(tmp_path / "p1"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 359
    ft = train(TrainConfig(**{**base, "model": "pit-n"}, init=str(tmp_path / "p1"), out=str(tmp_path / "ft")))
    assert ft["model_name"] == "pit-d1w16"
    cases = [(["--patch-size", "3", "--out", str(tmp_path / "x")], "image size 8x8 is not divisible by patch size 3"),
             (["--patch-size", "2", "--out", str(tmp_path / "p1")], "already holds a checkpoint")]
    for args, match in cases:
        assert main(["convert", "--checkpoint", str(tmp_path / "p4"), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert main(["train", "--out", str(tmp_path / "p1"), "--resume", "--model", "pit-n", "--progress", "false"]) == 2
    assert "holds a converted model, not a stopped run" in capsys.readouterr().err
