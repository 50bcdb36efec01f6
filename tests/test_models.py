import math

import pytest
import torch

from pixformer import PixformerError, attention, create_model, list_models
from pixformer.layout import grid_coords
from pixformer.models.pos_embed import sample_table, sincos_2d


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_forward_backward(name):
    """Each name's width, heads and patch size at one block (depth is data, not code), tiny input."""
    torch.manual_seed(0)
    with torch.device("meta"):
        p = create_model(name, img_size=32, depth=1).cfg.patch_size
    model = create_model(name, img_size=2 * p, num_classes=3, depth=1)
    x = torch.randn(2, model.cfg.in_chans, 2 * p, 2 * p)
    if name.startswith("dit-"):                                            # a denoiser: (x_t, t, y) -> noise
        out = model(x, torch.tensor([3, 900]), torch.tensor([0, 3]))      # class 3: the null class
        assert out.shape == x.shape
    else:
        out = model(x)
        assert out.shape == (2, 3)
    out.sum().backward()
    grads = [prm.grad for prm in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_size_table_matches_vit_and_deit():
    for name, (depth, dim, heads, params_m) in {"vit-t/16": (12, 192, 3, 5.7), "vit-s/16": (12, 384, 6, 22.1),
                                                "vit-b/16": (12, 768, 12, 86.6)}.items():
        with torch.device("meta"):
            model = create_model(name, img_size=224, num_classes=1000)
        assert (model.cfg.depth, model.cfg.dim, model.cfg.heads) == (depth, dim, heads)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params_m
    assert create_model("pit-s", img_size=8, depth=1).cfg.patch_size == 1


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
@pytest.mark.parametrize("hw", [(16, 16), (8, 24)])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_token_counts_and_shapes(patch, hw, pool):
    model = create_model(f"vit-n/{patch}", img_size=hw, num_classes=5, depth=1, dim=16, heads=2, pool=pool)
    x = torch.randn(2, 3, *hw)
    tokens, grid = model.embed(x)
    assert grid == (hw[0] // patch, hw[1] // patch)
    assert tokens.shape == (2, grid[0] * grid[1], 16)
    feats = model.encode(model.prepend_cls(tokens))
    assert feats.shape == (2, grid[0] * grid[1] + (pool == "cls"), 16)
    assert model(x).shape == (2, 5)


def test_pixel_tokens_are_a_linear_map_of_channels():
    model = create_model("pit-n", img_size=4, depth=1, dim=8, heads=2, pos_embed="none")
    x = torch.randn(1, 3, 4, 4)
    tokens, _ = model.embed(x)
    expected = x[0, :, 1, 2] @ model.patch_embed.weight.t() + model.patch_embed.bias  # pixel (1, 2) is token 6
    torch.testing.assert_close(tokens[0, 1 * 4 + 2], expected)


def test_patch_order_matches_image_layout():
    model = create_model("vit-n/2", img_size=(4, 6), depth=1, dim=8, heads=2)
    x = torch.arange(1 * 3 * 4 * 6, dtype=torch.float32).view(1, 3, 4, 6)
    patches, grid = model.patchify(x)
    assert grid == (2, 3)
    # token 4 = grid row 1, col 1 -> pixels rows 2..3, cols 2..3; features ordered (p1 p2 c)
    assert torch.equal(patches[0, 4].view(2, 2, 3).permute(2, 0, 1), x[0, :, 2:4, 2:4])


def test_bad_shapes_give_clear_errors():
    model = create_model("vit-n/4", img_size=16, depth=1, dim=16, heads=2)
    with pytest.raises(PixformerError, match="not divisible by patch size 4"):
        model(torch.randn(1, 3, 18, 16))
    for net, args in ((model, ()), (create_model("convmixer-16/2", img_size=16, depth=1), ()),
                      (create_model("dit-n/2", img_size=16, in_chans=3, depth=1, dim=16, heads=2), (torch.zeros(1),))):
        with pytest.raises(PixformerError, match=r"expected images of shape \(B, 3, H, W\), got \(1, 1, 16, 16\)"):
            net(torch.randn(1, 1, 16, 16), *args)
    with pytest.raises(PixformerError, match="not divisible by patch size 3"):
        create_model("vit-t/3", img_size=32)
    with pytest.raises(PixformerError, match="did you mean vit-t/2"):
        create_model("vti-t/2")
    with pytest.raises(PixformerError, match="unknown setting"):
        create_model("vit-t/2", img_size=32, depht=3)
    for name in ("vit-n/4", "convmixer-16/1", "dit-s/2"):          # sizes the data would never set
        with pytest.raises(PixformerError, match="image size 0x0: both sides must be at least 1"):
            create_model(name, img_size=0)
        with pytest.raises(PixformerError, match="--in-chans must be at least 1, got 0"):
            create_model(name, img_size=16, in_chans=0)
        with pytest.raises(PixformerError, match="--num-classes must be at least 0"):
            create_model(name, img_size=16, num_classes=-1)


def test_learned_pe_resampled_is_identity_at_same_size():
    model = create_model("vit-n/2", img_size=(12, 8), depth=1, dim=16, heads=2)
    table = model.pos_table.reshape(-1, 16)
    same = model.position_embedding((6, 4), grid_coords(6, 4))  # the resampling path, forced
    torch.testing.assert_close(same, table, atol=1e-6, rtol=0)
    assert torch.equal(model.position_embedding((6, 4)), table)


def test_learned_pe_resamples_to_other_sizes():
    """Trained at 28x28, evaluated at 32x32 (the PiT paper's ImageNet setting)."""
    model = create_model("pit-n", img_size=28, num_classes=4, depth=1, dim=16, heads=2)
    pe = model.position_embedding((32, 32))
    assert pe.shape == (1024, 16)
    # corners map onto corners of the table, border values are kept
    torch.testing.assert_close(pe[0], model.pos_table[0, 0])
    torch.testing.assert_close(pe[-1], model.pos_table[-1, -1])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_sample_table_bilinear_by_hand():
    table = torch.arange(2 * 2 * 1, dtype=torch.float32).view(2, 2, 1)  # [[0, 1], [2, 3]]
    out = sample_table(table, torch.tensor([[0.5, 0.5], [0.0, 0.25], [1.0, 1.0]]))
    torch.testing.assert_close(out[:, 0], torch.tensor([1.5, 0.25, 3.0]))


def test_sincos2d_matches_hand_computed_values():
    dim = 8  # 4 channels for the row, 4 for the column; each: [sin(p w0), sin(p w1), cos(p w0), cos(p w1)]
    coords = torch.tensor([[0.0, 0.0], [2.0, 3.0]])
    emb = sincos_2d(coords, dim)
    w = [1.0, 10000 ** -0.5]
    row, col = 2.0, 3.0
    expected = [math.sin(row * w[0]), math.sin(row * w[1]), math.cos(row * w[0]), math.cos(row * w[1]),
                math.sin(col * w[0]), math.sin(col * w[1]), math.cos(col * w[0]), math.cos(col * w[1])]
    torch.testing.assert_close(emb[1], torch.tensor(expected))
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))


def test_sincos_model_is_recomputed_for_any_grid():
    model = create_model("vit-n/2", img_size=8, depth=1, dim=16, heads=2, pos_embed="sincos2d")
    assert not any("pos" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model.position_embedding((3, 5)), sincos_2d(grid_coords(3, 5), 16))


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_plain_softmax_reference(masked):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    mask = torch.rand(2, 1, 17, 17) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query sees at least one key
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    reference = scores.softmax(-1) @ v
    out, probs = attention(q, k, v, mask, backend="sdpa")
    assert probs is None
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    out_math, probs = attention(q, k, v, mask, backend="math", need_weights=True)
    torch.testing.assert_close(out_math, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 17))


def test_model_output_is_the_same_through_both_backends():
    from pixformer import set_attention_backend
    model = create_model("pit-n", img_size=6, depth=2, dim=16, heads=2).eval()
    x = torch.randn(2, 3, 6, 6)
    a = model(x)
    b = set_attention_backend(model, "math")(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(PixformerError, match="unknown attention backend"):
        set_attention_backend(model, "nope")


def test_record_attention_returns_one_map_per_layer():
    from pixformer import record_attention
    model = create_model("vit-n/2", img_size=8, depth=3, dim=16, heads=2).eval()
    with record_attention(model) as maps:
        model(torch.randn(1, 3, 8, 8))
    assert [m.shape for m in maps] == [(1, 2, 17, 17)] * 3
    assert model.blocks[0].attn.record_to is None


def test_drop_path_only_in_training():
    model = create_model("vit-n/2", img_size=8, depth=2, dim=16, heads=2, drop_path=0.5, num_classes=3)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    assert model.blocks[-1].drop_path == 0.5 and model.blocks[0].drop_path == 0.0


def test_factorized_position_embedding_is_rows_plus_columns_on_any_grid():
    """NaViT's factorized embedding: phi_row(r) + phi_col(c), on a non-square grid, at any subset of
    coordinates, and at another grid (fractional coordinates) still a sum of a row and a column part."""
    torch.manual_seed(0)
    model = create_model("vit-n/2", img_size=(8, 12), pos_embed="factorized", depth=1, dim=16, heads=2)
    assert model.pos_rows.shape == (4, 16) and model.pos_cols.shape == (6, 16) and model.pos_table is None
    full = model.position_embedding((4, 6)).reshape(4, 6, 16)
    torch.testing.assert_close(full, model.pos_rows[:, None] + model.pos_cols[None])
    coords = torch.tensor([[3, 5], [0, 2], [1, 1]])
    torch.testing.assert_close(model.position_embedding((4, 6), coords), full[coords[:, 0], coords[:, 1]])
    other = model.position_embedding((7, 3)).reshape(7, 3, 16)                       # an unseen grid
    torch.testing.assert_close(other - other[:, :1] - other[:1] + other[:1, :1], torch.zeros_like(other),
                               atol=1e-6, rtol=0)
    assert model(torch.randn(2, 3, 14, 6)).shape == (2, 10)


def test_init_from_resamples_factorized_tables_to_another_size(tmp_path):
    from pixformer import TrainConfig, train
    from pixformer.engine.checkpoint import init_from
    train(TrainConfig(model="vit-n/2", data="digits", model_args=dict(depth=1, dim=16, heads=2, pos_embed="factorized"),
                      epochs=1, train_subset=64, progress=False, out=str(tmp_path / "r")))
    bigger = create_model("vit-n/2", img_size=12, in_chans=1, num_classes=10, depth=1, dim=16, heads=2,
                          pos_embed="factorized")
    got = init_from(bigger, tmp_path / "r")
    assert {"pos_rows", "pos_cols"} <= set(got["loaded"]) and bigger.pos_rows.shape == (6, 16)


def test_conv_stem_halves_the_image_per_convolution_and_maps_to_the_width():
    """stem='conv': log2(p) 3x3 stride-2 convolutions (one stride-1 one for p = 1), then a 1x1 map to the
    width; the tokens are the stem's output cells in row-major order, as patchify's; any square size runs."""
    torch.manual_seed(0)
    for p, widths in ((1, [64]), (2, [64]), (4, [32, 64]), (8, [16, 32, 64])):
        model = create_model(f"vit-d2w64/{p}", img_size=32, num_classes=3, stem="conv").eval()
        assert [layer[0].out_channels for layer in model.stem] == widths
        assert [layer[0].stride[0] for layer in model.stem] == [2 if p > 1 else 1] * len(widths)
        x = torch.randn(2, 3, 32, 32)
        tokens, grid = model.embed(x)
        assert grid == (32 // p, 32 // p) and tokens.shape == (2, (32 // p) ** 2, 64)
        cells = model.patch_embed(model.stem(x))                          # (B, D, h, w)
        expect = cells[:, :, 1, 2] + model.pos_table[1, 2]                # the token of row 1, column 2
        assert torch.allclose(tokens[:, 1 * (32 // p) + 2], expect, atol=1e-6)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)           # the position table resampled
        convs = [m for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d)]
        side = [32 // (2 ** (i + 1)) if p > 1 else 32 for i in range(len(convs))]
        by_hand = sum(2 * s * s * 9 * c.in_channels * c.out_channels for s, c in zip(side, convs))
        linear = create_model(f"vit-d2w64/{p}", img_size=32, num_classes=3)
        stem_linear = 2 * (32 // p) ** 2 * 3 * p * p * 64
        assert model.flops() - linear.flops() == by_hand + 2 * (32 // p) ** 2 * widths[-1] * 64 - stem_linear


def test_conv_stem_refuses_what_embeds_patches_one_by_one():
    with pytest.raises(PixformerError, match="power of 2"):
        create_model("vit-n/3", img_size=24, stem="conv")
    with pytest.raises(PixformerError, match="stem must be"):
        create_model("vit-n/4", img_size=32, stem="convolutional")
    model = create_model("vit-n/4", img_size=32, stem="conv")
    with pytest.raises(PixformerError, match="whole images"):
        model.embed_tokens(torch.randn(1, 4, 48), (2, 2))
    from pixformer import TrainConfig
    from pixformer.engine.loop import check_run
    from pixformer.tasks import TASKS
    for cfg, task in ((TrainConfig(model="vit-n/4", model_args={"stem": "conv"}, task="mae"), "mae"),
                      (TrainConfig(model="vit-n/4", model_args={"stem": "conv"}, max_side=32), "classify"),
                      (TrainConfig(model="vit-n/4", model_args={"stem": "conv"}, seq_parallel=2), "classify")):
        with pytest.raises(PixformerError, match="--stem conv embeds whole images"):
            check_run(cfg, TASKS[task])


@pytest.mark.parametrize("name, kw, message", [
    ("pit-n", dict(img_size="32"), "--img-size must be 2 values"),
    ("vit-n/2", dict(depth="4"), "--depth must be an integer, got '4'"),
    ("dit-n/2", dict(img_size=(8, 8, 4)), "--img-size must be 2 values"),
    ("convmixer-64/2", dict(kernel_size=3.5), "--kernel-size must be an integer"),
])
def test_a_model_setting_of_the_wrong_type_is_refused_by_name(name, kw, message):
    with pytest.raises(PixformerError, match=message):
        create_model(name, **kw)
    assert create_model(name, img_size=[8, 8]).cfg.img_size == (8, 8)      # a list (JSON) is a size


def test_the_residual_stream_stays_fp32_under_bf16_autocast_in_every_model():
    from pixformer.models import blocks_of
    from pixformer.models.mae import MAEConfig, MaskedAutoencoder
    enc = dict(img_size=(8, 8), patch_size=2, depth=1, dim=32, heads=2)
    cases = [(create_model("vit-n/2", **enc, pos_embed="none", pool="mean"), lambda m: m(torch.randn(2, 3, 8, 8))),
             (create_model("vit-n/2", **enc), lambda m: m(torch.randn(2, 3, 8, 8))),
             (create_model("dit-n/2", img_size=8, depth=1, dim=32, heads=2, num_classes=3),
              lambda m: m(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2]))),
             (MaskedAutoencoder(MAEConfig(encoder=enc, decoder_dim=16, decoder_depth=1, decoder_heads=2)),
              lambda m: m(torch.randn(2, 3, 8, 8), torch.arange(4).expand(2, 4)))]
    for model, run in cases:
        seen = []
        for block in blocks_of(model):
            block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(model)
        assert seen and set(seen) == {torch.float32}, (type(model).__name__, seen)
