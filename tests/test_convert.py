"""Patch-size conversion (FlexiViT's pseudo-inverse resize): identity at the same patch size, the
PI-resize property, a converted checkpoint that evaluates and starts runs, and its bad input."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from pixformer import TrainConfig, create_model, train
from pixformer.cli import main
from pixformer.engine.flexi import pi_resize, resize_matrix


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
    assert "pit-d1w16h2 (from patch 4)" in capsys.readouterr().out
    state = json.loads((tmp_path / "p1" / "checkpoint" / "state.json").read_text())
    assert state["model"]["config"]["patch_size"] == 1 and state["converted_from"]["patch_size"] == 4
    assert (tmp_path / "p1" / "checkpoint" / "ema.safetensors").exists()
    assert main(["eval", "--checkpoint", str(tmp_path / "p1"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 359
    ft = train(TrainConfig(**{**base, "model": "pit-n"}, init=str(tmp_path / "p1"), out=str(tmp_path / "ft")))
    assert ft["model_name"] == "pit-d1w16h2"
    cases = [(["--patch-size", "3", "--out", str(tmp_path / "x")], "image size 8x8 is not divisible by patch size 3"),
             (["--patch-size", "2", "--out", str(tmp_path / "p1")], "already holds a checkpoint"),
             (["--patch-size", "0", "--out", str(tmp_path / "x")], "--patch-size must be at least 1, got 0")]
    for args, match in cases:
        assert main(["convert", "--checkpoint", str(tmp_path / "p4"), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert main(["train", "--out", str(tmp_path / "p1"), "--resume", "--model", "pit-n", "--progress", "false"]) == 2
    assert "holds a converted model, not a stopped run" in capsys.readouterr().err


def test_convert_refuses_a_convolutional_stem_in_one_line(tmp_path, capsys):
    train(TrainConfig(model="vit-n/4", data="digits", model_args=dict(depth=1, dim=16, heads=2, stem="conv"), epochs=1,
                      train_subset=32, progress=False, out=str(tmp_path / "conv")))
    assert main(["convert", "--checkpoint", str(tmp_path / "conv"), "--patch-size", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "convolutional stem" in err and not (tmp_path / "x").exists()


# ---- pretrained weights from transformers and timm ---------------------------------------------
@pytest.fixture
def hf_vit(tmp_path):
    """A randomly initialised transformers ViT (a classifier), saved as users have them: a folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=8, patch_size=2, num_channels=3, num_labels=5, layer_norm_eps=1e-6)
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():                                   # leave the zero / constant inits: every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def pixformer_twin(**kw):
    return create_model("vit-n/2", img_size=8, in_chans=3, num_classes=5, depth=2, dim=32, heads=4, mlp_ratio=2.0, **kw)


def test_a_transformers_vit_folder_gives_that_models_features_and_logits(hf_vit):
    from pixformer.engine.checkpoint import init_from
    hf, folder = hf_vit
    model = pixformer_twin().eval()
    got = init_from(model, folder)
    assert got["format"] == "transformers" and got["new"] == [] and got["unused"] == []
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        feats = model.encode(model.prepend_cls(model.embed(x)[0]))
        torch.testing.assert_close(feats, hf.vit.layernorm(out.hidden_states[-1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), out.logits, atol=1e-5, rtol=1e-5)


def test_a_timm_state_dict_gives_the_same_model(hf_vit, tmp_path):
    """timm's layout written out by hand from the transformers model (fused qkv, fc1 / fc2, a conv patch
    embedding, the class token's position row in pos_embed)."""
    from safetensors.torch import load_file, save_file

    from pixformer.engine.checkpoint import init_from
    hf, folder = hf_vit
    sd = {k.removeprefix("vit."): v for k, v in load_file(folder / "model.safetensors").items()}   # the saved names
    timm = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
            "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
            "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(2):
        a, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            timm[b + "attn.qkv." + part] = torch.cat([sd[a + f"attention.attention.{n}.{part}"] for n in ("query", "key", "value")])
            for src, dst in (("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"),
                             ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
                timm[b + dst + "." + part] = sd[a + src + "." + part]
    save_file({k: v.contiguous() for k, v in timm.items()}, tmp_path / "timm.safetensors")
    model = pixformer_twin().eval()
    got = init_from(model, tmp_path / "timm.safetensors")
    assert got["format"] == "timm" and got["new"] == [] and got["unused"] == []
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def test_fine_tuning_a_transformers_vit_at_another_patch_size_is_one_command(hf_vit, tmp_path, capsys):
    from test_data import write_image_folder
    _, folder = hf_vit
    write_image_folder(tmp_path / "rgb", classes=("a", "b", "c"), per_class=12, size=(8, 8))
    code = main(["train", "--model", "pit-n", "--depth", "2", "--dim", "32", "--heads", "4", "--mlp-ratio", "2",
                 "--init", str(folder), "--data", str(tmp_path / "rgb"), "--epochs", "1", "--batch-size", "8",
                 "--progress", "false", "--out", str(tmp_path / "ft")])
    out = capsys.readouterr().out
    assert code == 0 and "(transformers)" in out and "converted: patch_embed.weight (patch 2 -> 1)" in out
    assert "new: head.* (2)" in out                                          # 3 classes here, 5 in the source


def test_unknown_or_mismatched_import_formats_are_one_line(tmp_path, hf_vit, capsys):
    from safetensors.torch import save_file
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    _, folder = hf_vit
    cases = [(tmp_path / "bert", "holds a transformers 'bert' model, not a ViT"),
             (tmp_path / "other.safetensors", r"not a timm VisionTransformer state dict .*encoder.weight"),
             (tmp_path / "nothing", "--init .*nothing does not exist")]
    for path, match in cases:
        assert main(["train", "--model", "vit-n/2", "--init", str(path), "--epochs", "1", "--progress", "false",
                     "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    from test_data import write_image_folder
    write_image_folder(tmp_path / "rgb", per_class=6, size=(8, 8))
    assert main(["train", "--model", "vit-n/2", "--dim", "64", "--init", str(folder), "--epochs", "1",
                 "--data", str(tmp_path / "rgb"), "--progress", "false", "--out", str(tmp_path / "w")]) == 2
    assert re.search(r"does not fit this model.*\(32", capsys.readouterr().err)   # another width: keys named


def test_init_keeps_absolute_rows_where_they_are(tmp_path):
    """A table indexed by absolute coordinates is not stretched onto another grid: the rows and columns
    both grids have are copied, the others keep the new model's own; fractional tables are resampled."""
    from pixformer.engine.checkpoint import init_from, save_checkpoint
    saved = {}
    for kind in ("learned", "factorized"):
        saved[kind] = create_model("pit-n", img_size=6, pos_embed=kind, pos_coords="absolute", depth=1)
        save_checkpoint(tmp_path / kind, {}, saved[kind])
        for side in (9, 4):
            new = create_model("pit-n", img_size=side, pos_embed=kind, pos_coords="absolute", depth=1)
            own = {k: v.clone() for k, v in new.state_dict().items()}
            init_from(new, tmp_path / kind)
            got, src, n = new.state_dict(), saved[kind].state_dict(), min(6, side)
            for name in (["pos_table"] if kind == "learned" else ["pos_rows", "pos_cols"]):
                common = (slice(0, n),) * (got[name].ndim - 1)
                assert torch.equal(got[name][common], src[name][common]), (kind, side, name)
                if side > 6:
                    assert torch.equal(got[name][6:], own[name][6:]), (kind, side, name)
    stretched = create_model("pit-n", img_size=9, depth=1)      # fractional: resampled, the corners kept
    init_from(stretched, tmp_path / "learned")
    table, src = stretched.state_dict()["pos_table"], saved["learned"].state_dict()["pos_table"]
    torch.testing.assert_close(table[8, 8], src[5, 5])
    assert not torch.equal(table[5, 5], src[5, 5])
