import json

import pytest
import torch
from torch import nn

from pixformer import PixformerError, create_model
from pixformer.engine.checkpoint import load_model
from pixformer.cli import main
from pixformer.models.convmixer import ConvMixer, ConvMixerConfig


def tiny(**kw):
    return ConvMixer(ConvMixerConfig(**{**dict(img_size=8, patch_size=2, in_chans=3, num_classes=4, dim=16,
                                               depth=2, kernel_size=3), **kw}))


def test_forward_backward_at_tiny_size():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(3, 3, 8, 8)
    logits = model(x)
    assert logits.shape == (3, 4)
    logits.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert model(x).shape == (3, 4)
    assert model(torch.randn(2, 3, 12, 12)).shape == (2, 4)  # any size the patch tiles


def test_structure_follows_the_paper():
    model = tiny(patch_size=4, kernel_size=5)
    stem = model.patch_embed
    assert isinstance(stem, nn.Conv2d) and stem.kernel_size == (4, 4) and stem.stride == (4, 4)
    block = model.blocks[0]
    depthwise = block.spatial[0]
    assert depthwise.groups == 16 and depthwise.kernel_size == (5, 5)
    assert block.channel[0].kernel_size == (1, 1)
    assert [type(m) for m in block.spatial] == [nn.Conv2d, nn.GELU, nn.BatchNorm2d]
    with pytest.raises(PixformerError, match="expected images"):
        model(torch.randn(1, 1, 8, 8))


def test_flops_match_a_count_of_every_conv_and_linear():
    model = tiny(img_size=16, patch_size=2, kernel_size=3, dim=8, depth=3)
    counted = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            counted.append(2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
        else:
            counted.append(2 * m.in_features * m.out_features)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    model(torch.randn(1, 3, 16, 16))
    assert model.flops() == sum(counted)


def test_registry_names_defaults_and_settings():
    model = create_model("convmixer-256/8", img_size=32, num_classes=10)
    assert (model.cfg.dim, model.cfg.depth, model.cfg.kernel_size, model.cfg.patch_size) == (256, 8, 5, 2)
    model = create_model("convmixer-64/2", img_size=16, kernel_size=9, patch_size=1)
    assert (model.cfg.dim, model.cfg.kernel_size, model.cfg.patch_size) == (64, 9, 1)
    with pytest.raises(PixformerError, match="unknown setting"):
        create_model("convmixer-64/2", heads=4)
    with pytest.raises(PixformerError, match="not divisible"):
        create_model("convmixer-64/2", img_size=10, patch_size=4)


def test_one_training_run_through_the_cli_then_eval(tmp_path, capsys):
    out = tmp_path / "cm"
    assert main(["train", "--model", "convmixer-256/8", "--dim", "16", "--depth", "1", "--kernel-size", "3",
                 "--patch-size", "2", "--epochs", "1", "--train-subset", "64", "--batch-size", "32",
                 "--ema-decay", "0.5", "--out", str(out), "--progress", "false"]) == 0
    capsys.readouterr()
    model, state = load_model(out)  # EMA weights, BatchNorm statistics included
    assert state["model"]["arch"] == "convmixer" and model.cfg.kernel_size == 3 and model.cfg.patch_size == 2
    bn = model.blocks[0].spatial[2]
    assert bn.num_batches_tracked.item() == 2 and not torch.equal(bn.running_mean, torch.zeros(16))
    assert main(["eval", "--checkpoint", str(out), "--data", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 359
