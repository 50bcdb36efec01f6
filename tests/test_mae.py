"""MAE pretraining: masking, the target normalisations, the model against transformers' ViTMAE, the
loss ignoring visible tokens, the task in the engine (resume included), and its bad input."""
import json
import re

import pytest
import torch
from einops import rearrange

from pixformer import PixformerError, TrainConfig, train
from pixformer.cli import main
from pixformer.models.mae import MAEConfig, MaskedAutoencoder, random_keep, visible_count
from pixformer.tasks.mae import MAE, normalise_target


def tiny_mae(patch=2, hw=(8, 8), pool="cls", depth=2, dim=32):
    torch.manual_seed(0)
    return MaskedAutoencoder(MAEConfig(encoder=dict(img_size=hw, patch_size=patch, depth=depth, dim=dim, heads=2,
                                                    pool=pool), decoder_depth=1, decoder_dim=16, decoder_heads=2))


def test_the_planner_counts_the_encoder_over_the_visible_tokens_and_the_decoder_over_all():
    """train's selective-checkpointing rule counts an MAE step as it runs: the encoder's blocks over the
    visible tokens (and the class token), the decoder's over every position; a classifier's blocks at
    one length give the planner's own per-image count (less what it keeps outside the blocks)."""
    from pixformer import create_model
    from pixformer.engine.plan import blocks_peak_bytes, plan
    from pixformer.tasks import DataFacts
    from pixformer.tasks.mae import MAETaskConfig
    task = MAE(MAETaskConfig(mask_ratio=0.75), DataFacts(["a", "b"], 3, (16, 16), [0.0] * 3, [1.0] * 3))
    model = task.build_model("pit-t", dict(depth=3))
    assert task.block_tokens(model) == [64 + 1] * 3 + [256 + 1] * len(model.decoder_blocks)
    full = blocks_peak_bytes(model, [257] * (3 + len(model.decoder_blocks)), 4, "bf16")
    assert blocks_peak_bytes(model, task.block_tokens(model), 4, "bf16") < full
    classifier = create_model("pit-t", img_size=8, num_classes=10, depth=2)
    p, T, D = plan("pit-t", 8, 1, precision="fp32", depth=2), 65, 192
    assert blocks_peak_bytes(classifier, [T, T], 1, "fp32") == p.image_bytes["none"] - 4 * T * D - 4 * 3 * 8 * 8
    with pytest.raises(PixformerError, match="sequence lengths"):
        blocks_peak_bytes(classifier, [T], 1, "fp32")


@pytest.mark.parametrize("n,ratio", [(64, 0.75), (16, 0.75), (15, 0.5), (12, 0.9)])
def test_masking_keeps_floor_n_times_one_minus_r_and_restore_inverts_the_shuffle(n, ratio):
    noise = torch.rand(4, n, generator=torch.Generator().manual_seed(n))
    keep, mask, restore = random_keep(noise, ratio)
    k = int(n * (1 - ratio))
    assert keep.shape == (4, k) and (mask.sum(1) == n - k).all()
    shuffle = noise.argsort(1)
    assert torch.equal(shuffle.gather(1, restore), torch.arange(n).expand(4, -1))     # restore undoes the shuffle
    for b in range(4):                                                               # visible = mask 0 = smallest noise
        assert set(keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())
        assert noise[b, keep[b]].max() < noise[b, mask[b] == 1].min()
    again = random_keep(noise.clone(), ratio)                                        # the same noise, the same mask
    assert torch.equal(again[0], keep) and torch.equal(again[1], mask)


def test_the_encoder_sees_only_the_visible_tokens():
    model = tiny_mae(patch=1).eval()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    keep, _, _ = random_keep(torch.rand(2, 64), 0.75)
    model(torch.randn(2, 3, 8, 8), keep)
    assert seen == [16 + 1]                                                          # 16 visible + the class token


@pytest.mark.parametrize("patch,hw,pool", [(1, (8, 8), "cls"), (2, (8, 8), "mean"), (1, (6, 10), "cls"),
                                           (2, (4, 12), "cls")])
def test_prediction_shapes_and_zero_gradient_on_visible_tokens(patch, hw, pool):
    model = tiny_mae(patch, hw, pool)
    x = torch.randn(2, 3, *hw)
    N = (hw[0] // patch) * (hw[1] // patch)
    keep, mask, _ = random_keep(torch.rand(2, N), 0.75)
    pred = model(x, keep)
    assert pred.shape == (2, N, 3 * patch * patch)
    target, _, _ = normalise_target(x, patch, "none")
    pred.retain_grad()
    MAE.masked_mse(pred, target, mask).backward()
    visible = mask == 0
    assert (pred.grad[visible] == 0).all() and (pred.grad[~visible] != 0).any()


def test_target_normalisations_against_hand_computed_values():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) ** 1.3 / 50
    patches = rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=2, q=2)
    t, mean, std = normalise_target(x, 2, "patch")                           # MAE's norm-pix (unbiased variance)
    want = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(t, want)
    torch.testing.assert_close(t * std + mean, patches)
    t, _, _ = normalise_target(x, 1, "none")
    torch.testing.assert_close(t, rearrange(x, "b c h w -> b (h w) c"))
    t, mean, std = normalise_target(x, 1, "local", kernel=3)                 # pixel (1, 2): its 3x3 window, all channels
    window = x[0, :, 0:3, 1:4].reshape(-1)
    mu, var = window.mean(), window.var(unbiased=False)
    torch.testing.assert_close(t[0, 1 * 4 + 2], (x[0, :, 1, 2] - mu) / (var + 1e-6) ** 0.5, atol=1e-4, rtol=1e-4)
    corner = x[1, :, 0:2, 0:2].reshape(-1)                                    # at the border: the window inside the image
    torch.testing.assert_close(t[1, 0], (x[1, :, 0, 0] - corner.mean()) / (corner.var(unbiased=False) + 1e-6) ** 0.5,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t * std + mean, rearrange(x, "b c h w -> b (h w) c"), atol=1e-4, rtol=1e-4)


def test_the_model_and_loss_match_transformers_vitmae():
    """pixformer's MAE with its weights copied into transformers' ViTMAEForPreTraining: the same noise
    gives the same mask, the same prediction for every token and the same norm-pix loss."""
    tf = pytest.importorskip("transformers")
    ours = tiny_mae(patch=2, hw=(8, 8)).eval()
    cfg = tf.ViTMAEConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=128, decoder_hidden_size=16,
                          decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
                          layer_norm_eps=1e-6, norm_pix_loss=True, mask_ratio=0.75, qkv_bias=True)
    theirs = tf.ViTMAEForPreTraining(cfg).eval()
    sd, enc = {}, ours.encoder
    zero = lambda d: torch.zeros(1, 1, d)  # noqa: E731  (the class token's position: none)
    sd["vit.embeddings.cls_token"] = enc.cls_token
    sd["vit.embeddings.position_embeddings"] = torch.cat([zero(32), enc.position_embedding((4, 4))[None]], 1)
    sd["vit.embeddings.patch_embeddings.projection.weight"] = rearrange(enc.patch_embed.weight, "d (p q c) -> d c p q", p=2, q=2)
    sd["vit.embeddings.patch_embeddings.projection.bias"] = enc.patch_embed.bias
    for prefix, blocks in (("vit.layers", enc.blocks), ("decoder.decoder_layers", ours.decoder_blocks)):
        for i, b in enumerate(blocks):
            q, k, v = b.attn.qkv.weight.chunk(3)
            qb, kb, vb = b.attn.qkv.bias.chunk(3)
            for name, w, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb),
                                  ("o_proj", b.attn.proj.weight, b.attn.proj.bias),
                                  ("mlp.fc1", b.mlp[0].weight, b.mlp[0].bias), ("mlp.fc2", b.mlp[2].weight, b.mlp[2].bias)):
                full = name if name.startswith("mlp") else f"attention.{name}"
                sd[f"{prefix}.{i}.{full}.weight"], sd[f"{prefix}.{i}.{full}.bias"] = w, bias
            for theirs_name, norm in (("layernorm_before", b.norm1), ("layernorm_after", b.norm2)):
                sd[f"{prefix}.{i}.{theirs_name}.weight"], sd[f"{prefix}.{i}.{theirs_name}.bias"] = norm.weight, norm.bias
    sd["vit.layernorm.weight"], sd["vit.layernorm.bias"] = enc.norm.weight, enc.norm.bias
    sd["decoder.mask_token"] = ours.mask_token
    sd["decoder.decoder_pos_embed"] = torch.cat([zero(16), ours.decoder_position((4, 4))[None]], 1)
    for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
        layer = getattr(ours, name)
        sd[f"decoder.{name}.weight"], sd[f"decoder.{name}.bias"] = layer.weight, layer.bias
    missing, unexpected = theirs.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m], missing

    x, noise = torch.randn(3, 3, 8, 8), torch.rand(3, 16)
    with torch.no_grad():
        out = theirs(pixel_values=x, noise=noise)
        keep, mask, _ = random_keep(noise, 0.75)
        pred = ours(x, keep)
        target, _, _ = normalise_target(x, 2, "patch")
    torch.testing.assert_close(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(MAE.masked_mse(pred, target, mask), out.loss, atol=1e-5, rtol=1e-5)


MAE_RUN = dict(task="mae", model="pit-n", data="digits", model_args=dict(depth=1, dim=16, heads=2),
               task_args=dict(decoder_depth=1, decoder_dim=16, decoder_heads=2, samples=4), batch_size=64,
               train_subset=256, progress=False, eval_batch_size=64)


def test_mae_run_writes_reconstructions_reports_pixel_loss_and_resumes_exactly(tmp_path, resumes_exactly):
    full = train(TrainConfig(**MAE_RUN, epochs=2, out=str(tmp_path / "full")))      # 4 steps per epoch
    assert (tmp_path / "full" / "reconstructions" / "epoch002.png").exists()
    assert full["model_name"] == "mae-pit-d1w16h2" and full["val_loss"] < 1 and "val_target_loss" in full
    resumes_exactly({**MAE_RUN, "epochs": 2}, full)


def test_eval_of_an_mae_run_reports_loss_and_n(tmp_path, capsys):
    train(TrainConfig(**MAE_RUN, epochs=1, out=str(tmp_path / "run")))
    out = capsys.readouterr()
    line = next(l for l in (out.out + out.err).splitlines() if " epoch 1/1 " in l)   # the objective beside train's
    assert re.search(r"train loss [\d.]+  val pixel loss [\d.]+  val loss [\d.]+  \(data wait", line), line
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 144 and 0 < result["loss"] < 1 and result["target_loss"] > 0


@pytest.mark.parametrize("args,match", [
    (["--mask-ratio", "1.0"], "mask ratio must be between 0 and 1"),
    (["--mask-ratio", "0"], "mask ratio must be between 0 and 1"),
    (["--mask-ratio", "0.999"], "leaves no visible token of 64"),
    (["--target", "pixels"], "target must be one of"),
    (["--target", "patch"], "a 1x1 patch of one channel is a single value"),       # digits: 1 channel
    (["--model", "convmixer-16/1"], "--task mae trains vit models"),
    (["--label-smoothing", "0.1"], "task 'mae' has no setting.*label_smoothing belongs to classify"),
])
def test_bad_mae_settings_are_one_line_errors_before_training(tmp_path, capsys, args, match):
    base = ["train", "--task", "mae", "--model", "pit-n", "--epochs", "1", "--out", str(tmp_path / "r"),
            "--progress", "false"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "r").exists()                                   # refused before the run folder


def test_visible_count():
    assert visible_count(64, 0.75) == 16 and visible_count(10, 0.75) == 2 and visible_count(3, 0.5) == 1


# ---- fine-tuning and linear probing from a pretrained run ----------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("mae") / "run"
    train(TrainConfig(**MAE_RUN, epochs=1, out=str(out)))
    return out


def test_fine_tuning_starts_from_the_mae_encoder_exactly_and_names_what_it_skipped(pretrained, tmp_path, capsys):
    from safetensors.torch import load_file
    from pixformer import create_model
    from pixformer.engine.checkpoint import init_from
    mae = load_file(pretrained / "checkpoint" / "model.safetensors")
    clf = create_model("pit-n", img_size=8, in_chans=1, num_classes=10, depth=1, dim=16, heads=2)
    got = init_from(clf, pretrained)
    for key, value in clf.state_dict().items():
        if key.startswith("head."):
            assert key in got["new"]
        else:
            assert torch.equal(value, mae[f"encoder.{key}"]), key                   # loaded exactly
    assert "mask_token" in got["unused"] and any(k.startswith("decoder_blocks.") for k in got["unused"])
    # through the CLI: a classifier run from the MAE run, at another input size (the table is resampled)
    code = main(["train", "--model", "pit-n", "--depth", "1", "--dim", "16", "--heads", "2", "--init", str(pretrained),
                 "--img-size", "12", "--epochs", "1", "--train-subset", "64", "--batch-size", "32",
                 "--progress", "false", "--layer-decay", "0.75", "--out", str(tmp_path / "ft")])
    out = capsys.readouterr().out
    assert code == 0 and "init from" in out and "new: head.* (2); not used: decoder_blocks.* (12), decoder_embed.* (2)" in out
    # MAE's fine-tuning head: the mean of the tokens through a norm of its own, the final norm unused
    gap = create_model("pit-n", img_size=8, in_chans=1, num_classes=10, depth=1, dim=16, heads=2, pool="mean",
                       fc_norm=True)
    got = init_from(gap, pretrained)
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} == set(got["new"])
    assert {"encoder.norm.weight", "encoder.norm.bias", "encoder.cls_token"} <= set(got["unused"])
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        feats = gap.encode(gap.embed(x)[0])                                   # no per-token norm
        torch.testing.assert_close(gap(x), gap.head(torch.nn.functional.layer_norm(feats.mean(1), (16,),
                                   gap.fc_norm.weight, gap.fc_norm.bias, eps=1e-6)))
    with pytest.raises(PixformerError, match="fc_norm normalises the mean of the tokens: it needs pool='mean'"):
        create_model("pit-n", img_size=8, fc_norm=True)
    wider = create_model("pit-n", img_size=8, in_chans=1, depth=1, dim=32, heads=2)
    with pytest.raises(PixformerError, match=r"does not fit this model.*encoder|does not fit this model.*\(16"):
        init_from(wider, pretrained)


def test_layer_decay_gives_each_parameter_the_multiplier_computed_by_hand():
    from pixformer import create_model
    from pixformer.engine.optim import param_groups
    model = create_model("pit-n", img_size=4, depth=3, dim=16, heads=2)
    scale = {}
    for group in param_groups(model, 0.05, layer_decay=0.5):
        for p in group["params"]:
            scale[id(p)] = group["lr_scale"]
    named = dict(model.named_parameters())
    want = {"cls_token": 0.5 ** 4, "pos_table": 0.5 ** 4, "patch_embed.weight": 0.5 ** 4,
            "blocks.0.attn.qkv.weight": 0.5 ** 3, "blocks.1.mlp.0.bias": 0.5 ** 2, "blocks.2.norm2.weight": 0.5,
            "norm.weight": 1.0, "head.weight": 1.0}
    assert {k: scale[id(named[k])] for k in want} == want
    assert len(scale) == len(named)                                                  # every parameter, once


def test_the_linear_probe_leaves_the_encoder_bit_identical(pretrained, tmp_path):
    from safetensors.torch import load_file
    r = train(TrainConfig(task="probe", model="pit-n", data="digits", model_args=dict(depth=1, dim=16, heads=2),
                          init=str(pretrained), epochs=2, batch_size=32, train_subset=128, lr=0.01, progress=False,
                          out=str(tmp_path / "probe")))
    mae = load_file(pretrained / "checkpoint" / "model.safetensors")
    probe = r["model"]
    for key, value in probe.encoder.state_dict().items():
        assert torch.equal(value, mae[f"encoder.{key}"]), key
    assert not probe.bn.affine and probe.bn.weight is None                               # no affine parameters
    assert probe.encoder.training is False and r["model_name"] == "probe-pit-d1w16h2"
    rows = [json.loads(line) for line in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]                                # the head learns
    assert (probe.bn.running_mean != 0).any()                                            # the statistics learned


def test_probe_and_init_mistakes_are_one_line_errors(tmp_path, capsys):
    for args, match in ((["--task", "probe"], "--task probe needs --init RUN"),
                        (["--init", str(tmp_path)], "not a pixformer run")):
        assert main(["train", "--model", "pit-n", *args, "--out", str(tmp_path / "r"), "--progress", "false"]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1


def test_a_probe_of_a_classifier_trains_a_new_head_on_its_frozen_encoder(tmp_path):
    from pixformer.engine.checkpoint import init_from
    from pixformer.models.probe import LinearProbe, ProbeModelConfig
    small = dict(depth=1, dim=16, heads=2)
    clf = train(TrainConfig(model="vit-n/4", data="digits", model_args=small, epochs=1, precision="fp32",
                            progress=False, out=str(tmp_path / "clf")))["model"]
    probe = LinearProbe(ProbeModelConfig(encoder=dict(clf.cfg.__dict__, num_classes=0), num_classes=10))
    start = {k: v.clone() for k, v in probe.head.state_dict().items()}
    got = init_from(probe, tmp_path / "clf", ("bn.", "head."))
    assert "head.weight" in got["new"] and "head.weight" in got["unused"]       # the classifier's head: not taken
    assert all(torch.equal(v, start[k]) for k, v in probe.head.state_dict().items())
    assert torch.equal(probe.encoder.patch_embed.weight, clf.patch_embed.weight)
