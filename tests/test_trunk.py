"""The seams later tasks build on: the attention spec (segment ids, separate key sequences), the
conditioned block, coordinate position embeddings, unpatchify, and blocks found by type."""
import importlib

import pytest
import torch
from torch import nn

from pixformer import AttnSpec, PixformerError, attention, create_model
from pixformer.engine.perf import apply_activation_checkpointing, apply_speed_settings, checkpointed_blocks
from pixformer.layout import grid_coords, patchify, unpatchify
from pixformer.models import Block, blocks_of

A = importlib.import_module("pixformer.models.attention")
SPEC_BACKENDS = ["math", "sdpa", "blocked"]


def packed(lengths, pad=0, D=8, H=2, seed=0):
    """q, k, v of several sequences packed into one (B=1), padded with `pad` tokens, and their segment ids."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths) + pad
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    ids = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)] + [torch.full((pad,), -1)])[None]
    return q, k, v, ids


@pytest.mark.parametrize("backend", SPEC_BACKENDS)
@pytest.mark.parametrize("budget", [1 << 22, 7])   # blocked: whole sequences, or a few query rows per block
def test_segment_ids_give_each_image_its_own_attention(backend, budget, monkeypatch):
    monkeypatch.setattr(A, "BLOCK_ELEMENTS", budget)
    lengths = [5, 9, 3]
    q, k, v, ids = packed(lengths, pad=2)
    out, _ = attention(q, k, v, AttnSpec(segment_ids=ids), backend=backend)
    start = 0
    for m in lengths:
        s = slice(start, start + m)
        alone, _ = attention(q[:, :, s], k[:, :, s], v[:, :, s], backend="math")
        torch.testing.assert_close(out[:, :, s], alone, atol=1e-5, rtol=1e-5)
        start += m
    assert torch.isfinite(out).all()                     # padding attends only padding: no empty rows


@pytest.mark.parametrize("backend", SPEC_BACKENDS)
def test_segment_ids_gradients_match_the_math_oracle(backend, monkeypatch):
    monkeypatch.setattr(A, "BLOCK_ELEMENTS", 11)
    q, k, v, ids = (t.double() if t.is_floating_point() else t for t in packed([4, 6], pad=1))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    spec = AttnSpec(segment_ids=ids)
    want = torch.autograd.grad(attention(q, k, v, spec, backend="math")[0].square().sum(), (q, k, v))
    got = torch.autograd.grad(attention(q, k, v, spec, backend=backend)[0].square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", SPEC_BACKENDS)
def test_queries_of_a_shard_against_all_keys_equal_full_attention(backend):
    q, k, v, ids = packed([7, 9])
    full, _ = attention(q, k, v, AttnSpec(segment_ids=ids), backend="math")
    for shard in (slice(0, 5), slice(5, 16), slice(3, 11)):       # contiguous shards of the queries
        out, _ = attention(q[:, :, shard], k, v, AttnSpec(segment_ids=ids[:, shard], kv_segment_ids=ids),
                           backend=backend)
        torch.testing.assert_close(out, full[:, :, shard], atol=1e-5, rtol=1e-5)
    strided = torch.arange(1, 16, 3)                                # a non-contiguous shard: a set of tokens
    out, _ = attention(q[:, :, strided], k, v, AttnSpec(segment_ids=ids[:, strided], kv_segment_ids=ids),
                       backend=backend)
    torch.testing.assert_close(out, full[:, :, strided], atol=1e-5, rtol=1e-5)


def test_mask_and_segment_ids_combine():
    q, k, v, ids = packed([6, 6])
    keep = torch.rand(12, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    keep.fill_diagonal_(True)
    want, _ = attention(q, k, v, keep & (ids[0, :, None] == ids[0, None, :]), backend="math")
    for backend in SPEC_BACKENDS:
        got, _ = attention(q, k, v, AttnSpec(mask=keep, segment_ids=ids), backend=backend)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_learned_additive_mask_gets_its_gradient_or_is_refused():
    q, k, v, _ = packed([5])
    bias = torch.zeros(1, 1, 5, 5, requires_grad=True)
    for backend in ("math", "sdpa"):
        grad, = torch.autograd.grad(attention(q, k, v, bias, backend=backend)[0].square().sum(), bias)
        assert grad.abs().sum() > 0
    with pytest.raises(PixformerError, match="'blocked' attention backend does not differentiate an additive mask"):
        attention(q, k, v, bias, backend="blocked")
    with torch.no_grad():                                  # no gradient asked: it simply runs
        attention(q, k, v, bias, backend="blocked")


def test_specs_no_backend_can_honour_are_refused_in_one_line():
    q, k, v, ids = packed([3, 3])
    for backend in ("varlen", "flash"):           # self-attention only, one fused kernel: not over gathered keys
        with pytest.raises(PixformerError, match="cannot attend over keys gathered from a sequence's shards"):
            attention(q, k, v, AttnSpec(group=object()), backend=backend)
    with pytest.raises(PixformerError, match="segment ids for 4 keys given with 6 keys"):
        attention(q, k, v, AttnSpec(segment_ids=ids[:, :4]), backend="blocked")


@pytest.mark.parametrize("backend", SPEC_BACKENDS)
def test_packed_images_through_the_trunk_equal_each_image_alone(backend):
    """Two images of different sizes, embedded at their own coordinates, packed into one sequence with
    padding: the encoder's output for each image equals that image encoded alone (fp32, 1e-5)."""
    model = create_model("pit-n", img_size=(4, 4), depth=2, dim=16, heads=2, pool="mean").eval()
    a, b = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 6)
    ta, tb = model.embed(a)[0], model.embed(b)[0]                            # (1, 16, D), (1, 12, D)
    pad = torch.zeros(1, 3, 16)
    x = torch.cat([ta, tb, pad], dim=1)                                      # (1, 31, D)
    ids = torch.tensor([[0] * 16 + [1] * 12 + [-1] * 3])
    from pixformer import set_attention_backend
    set_attention_backend(model, backend)
    with torch.no_grad():
        out = model.encode(x, AttnSpec(segment_ids=ids))
        torch.testing.assert_close(out[:, :16], model.encode(ta), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 16:28], model.encode(tb), atol=1e-5, rtol=1e-5)


# ---- patches and positions --------------------------------------------------------------------
@pytest.mark.parametrize("p,hw", [(1, (5, 7)), (2, (4, 10)), (4, (8, 4)), (3, (9, 6))])
def test_unpatchify_inverts_patchify(p, hw):
    x = torch.randn(2, 3, *hw)
    patches, grid = patchify(x, p)
    assert patches.shape == (2, grid[0] * grid[1], 3 * p * p)
    assert torch.equal(unpatchify(patches, p, grid), x)
    model = create_model(f"vit-n/{p}", img_size=hw, depth=1, dim=16, heads=2)
    assert torch.equal(model.unpatchify(*model.patchify(x)), x)
    with pytest.raises(PixformerError, match="do not make a"):
        unpatchify(patches[:, 1:], p, grid)


@pytest.mark.parametrize("kind", ["learned", "sincos2d"])
@pytest.mark.parametrize("grid", [(4, 6), (6, 3)])          # the trained grid, and another one (resampled)
def test_position_embedding_of_a_subset_equals_rows_of_the_full_table(kind, grid):
    model = create_model("pit-n", img_size=(4, 6), depth=1, dim=16, heads=2, pos_embed=kind)
    full = model.position_embedding(grid)                                    # (N, D)
    coords = grid_coords(*grid)
    g = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(len(coords), generator=g)[:5] for _ in range(3)])   # (B=3, 5) per image
    sub = model.position_embedding(grid, coords[keep])                      # (3, 5, D)
    torch.testing.assert_close(sub, full[keep], atol=1e-6, rtol=1e-6)
    if kind == "learned" and grid == (4, 6):
        assert torch.equal(full, model.pos_table.reshape(-1, 16))


def test_embed_at_given_coordinates_places_each_token():
    model = create_model("pit-n", img_size=(4, 4), depth=1, dim=16, heads=2)
    x = torch.randn(2, 3, 4, 4)
    patches, grid = model.patchify(x)
    shuffled = torch.randperm(16)
    moved, _ = model.embed(x, coords=grid_coords(*grid)[shuffled])         # token i placed at cell shuffled[i]
    torch.testing.assert_close(moved, model.patch_embed(patches) + model.position_embedding(grid)[shuffled])


def test_images_packs_and_shards_are_embedded_by_one_step(monkeypatch):
    """`embed_tokens` is the one embedding of a ViT: whole images (embed), packs (embed_packed) and a
    sequence-parallel shard (here one rank holding every token) all call it, and it is the patch
    embedding plus the position embedding of the given coordinates."""
    import torch.distributed as dist

    from pixformer.data.native import NativeBatcher
    from pixformer.engine.sequence import SequenceParallel
    model = create_model("vit-n/2", img_size=(4, 6), depth=1, dim=16, heads=2, num_classes=3).eval()
    x = torch.randn(2, 3, 4, 6)
    patches, grid = model.patchify(x)
    coords = grid_coords(*grid).flip(0)                                      # (N, 2) reversed order
    assert torch.equal(model.embed_tokens(patches, grid, coords),
                       model.patch_embed(patches) + model.position_embedding(grid, coords))
    calls = []
    embed_tokens = type(model).embed_tokens
    monkeypatch.setattr(type(model), "embed_tokens", lambda self, *a: calls.append(a) or embed_tokens(self, *a))
    with torch.no_grad():
        want = model(x)
        packed = NativeBatcher(2, True, max_side=6)([(im * 255).clamp(0, 255).byte() for im in x], lambda u: u.float())
        model(packed)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            got = SequenceParallel(model, dist.group.WORLD, "strided")(x)
        finally:
            dist.destroy_process_group()
    assert len(calls) == 3 and calls[1][0] is packed.patches
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_flex_hides_only_torchs_cpu_reference_notice(monkeypatch):
    """The flex backend silences torch's notice that uncompiled (CPU) flex_attention is a reference
    implementation, and nothing else: another warning raised inside it still shows."""
    import warnings

    def noisy(q, k, v, block_mask=None):
        warnings.warn(A._FLEX_EAGER_WARNING + "() - this will use an unfused implementation")
        warnings.warn("something else")
        return q
    monkeypatch.setitem(A._FLEX, ("flex_attention", "cpu"), noisy)
    q, k, v, ids = packed([3, 4])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        attention(q, k, v, AttnSpec(segment_ids=ids), backend="flex")
    assert [str(w.message) for w in seen] == ["something else"]


# ---- the block, the class token, blocks by type ------------------------------------------------
def test_conditioned_block_starts_as_the_identity_and_then_follows_its_condition():
    torch.manual_seed(0)
    block = Block(16, 2, cond_dim=8)
    from pixformer.models.vit import init_transformer
    init_transformer(block)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 8)
    assert torch.equal(block(x, cond=c), x)
    assert not list(block.norm1.parameters())                 # adaLN: the modulation is the affine part
    nn.init.normal_(block.modulation.weight, std=0.1)
    y1, y2 = block(x, cond=c), block(x, cond=c.flip(0))       # the same tokens, the conditions swapped
    assert not torch.allclose(y1, x) and not torch.allclose(y1, y2)
    with pytest.raises(PixformerError, match="pass cond"):
        block(x)


def test_the_class_token_is_an_explicit_step_and_norms_use_eps_1e6():
    cls = create_model("pit-n", img_size=4, depth=1, dim=16, heads=2)
    mean = create_model("pit-n", img_size=4, depth=1, dim=16, heads=2, pool="mean")
    t = torch.randn(2, 16, 16)
    assert cls.prepend_cls(t).shape == (2, 17, 16) and torch.equal(cls.prepend_cls(t)[:, 1:], t)
    assert mean.prepend_cls(t) is t
    assert cls.encode(t).shape == (2, 16, 16)                 # encode never adds a token by itself
    assert all(m.eps == 1e-6 for m in cls.modules() if isinstance(m, nn.LayerNorm))


class EncoderDecoder(nn.Module):
    """A model with two stacks of blocks and no `.blocks` attribute, as MAE will be."""

    def __init__(self):
        super().__init__()
        self.encoder = create_model("pit-n", img_size=4, depth=2, dim=16, heads=2, num_classes=0)
        self.decoder = nn.ModuleList(Block(16, 2) for _ in range(3))

    def forward(self, x):
        h = self.encoder.encode(self.encoder.embed(x)[0])
        for b in self.decoder:
            h = b(h)
        return h


def test_speed_switches_find_blocks_by_type_in_any_model():
    model = EncoderDecoder()
    assert len(blocks_of(model)) == 5
    apply_activation_checkpointing(model, 3, selective=True)
    assert checkpointed_blocks(model) == {"full": 3, "selective": 2}
    x = torch.randn(2, 3, 4, 4)
    model(x).sum().backward()
    apply_speed_settings(model, attn_backend="math", checkpoint_blocks=0, selective_checkpoint=False)
    assert checkpointed_blocks(model) == {"full": 0, "selective": 0}
    assert all(m.attn_backend == "math" for m in model.modules() if hasattr(m, "attn_backend"))


def test_a_resampled_table_is_what_the_model_uses_at_that_grid():
    from pixformer.models.pos_embed import resample_table
    model = create_model("pit-n", img_size=(4, 6), depth=1, dim=16, heads=2)
    for grid in ((8, 12), (3, 5), (4, 6)):
        torch.testing.assert_close(resample_table(model.pos_table, grid).reshape(-1, 16), model.position_embedding(grid))


def test_modulated_norm_is_layer_norm_then_modulation_keeping_only_its_input():
    from pixformer.models.vit import modulate, modulated_norm
    g = torch.Generator().manual_seed(0)
    x, shift, scale = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                       for s in ((2, 5, 8), (2, 1, 8), (2, 1, 8)))
    assert torch.autograd.gradcheck(lambda *a: modulated_norm(*a, 1e-6), (x, shift, scale))
    ref = modulate(torch.nn.functional.layer_norm(x, (8,), eps=1e-6), shift, scale)
    torch.testing.assert_close(modulated_norm(x, shift, scale, 1e-6), ref)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        modulated_norm(x, shift, scale, 1e-6)
    assert {t.data_ptr() for t in kept} == {x.data_ptr(), scale.data_ptr()}   # not the normalised x
    # under bf16 autocast, as a DiT block runs it: the composition's output and gradients
    xb, sb, cb = (t.detach().float().requires_grad_() for t in (x, shift, scale))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [f(*(t.bfloat16() for t in (xb, sb, cb))) for f in
                (lambda *a: modulated_norm(*a, 1e-6), lambda a, b, c: modulate(torch.nn.functional.layer_norm(a, (8,), eps=1e-6), b, c))]
    grads = [torch.autograd.grad(o.float().square().sum(), (xb, sb, cb)) for o in outs]
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_the_conditioning_map_runs_in_its_weights_precision_and_keeps_no_half_copy():
    from pixformer.models.vit import conditioning_map
    block = Block(16, 2, cond_dim=16)
    nn.init.normal_(block.modulation.weight)
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 16, requires_grad=True)
    kept = []
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        mod = conditioning_map(block.modulation, cond, torch.bfloat16)
        out = block(x.bfloat16(), None, cond)
    assert mod.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    torch.testing.assert_close(mod, block.modulation(torch.nn.functional.silu(cond)).bfloat16())   # fp32, then cast
    assert not [t for t in kept if t.shape in ((96, 16), (16, 96)) and t.dtype != torch.float32]   # no bf16 copy of the weight
    out.float().sum().backward()
    assert block.modulation.weight.grad.dtype == torch.float32 and cond.grad is not None


def test_specs_and_wrappers_that_cannot_mean_anything_are_one_line():
    from pixformer.engine.sequence import SequenceParallel
    from pixformer.models.attention import AttnSpec
    with pytest.raises(PixformerError, match="kv_segment_ids need the queries' segment_ids too"):
        AttnSpec(kv_segment_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(PixformerError, match="SequenceParallel needs the process group"):
        SequenceParallel(create_model("pit-n", img_size=4, depth=1), None)
