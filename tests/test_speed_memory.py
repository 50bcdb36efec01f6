"""Attention backends against the math oracle, activation checkpointing, bf16 / compile training
steps, and the cost planner against hand-computed numbers."""
import ctypes
import importlib
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pixformer import PixformerError, attention, create_model, set_attention_backend
from pixformer.models.attention import AttnSpec, available_backends
from pixformer.engine import perf
from pixformer.engine.perf import (apply_activation_checkpointing, apply_compile, apply_lean_mlp, apply_onednn_linear,
                                   apply_speed_settings, autocast_dtype, Speed, checkpointed_blocks, lean_mlps,
                                   onednn_available, set_allocator)
from pixformer.engine.plan import (SELECTIVE_ABOVE, largest_side, parse_bytes, plan, selective_above, selective_pays,
                                   vit_block_bytes)

A = importlib.import_module("pixformer.models.attention")  # the module (the package exports a function of that name)
FUSED = [b for b in available_backends() if b != "math"]


def tiny(patch=1, pool="cls", depth=2, **kw):
    torch.manual_seed(0)
    return create_model(f"vit-n/{patch}", img_size=8, num_classes=5, depth=depth, dim=32, heads=2, pool=pool, **kw)


def grads_of(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", FUSED)
def test_attention_function_matches_math_oracle(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(17, 17) > 0.3
    mask.fill_diagonal_(True)
    for m in (None, mask):
        want, _ = attention(q, k, v, m, backend="math")
        g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
        got, _ = attention(q, k, v, m, backend=backend)
        g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "blocked", "flex", "varlen", "auto"])
def test_a_query_with_no_key_gets_zeros_on_every_backend(backend):
    """A mask row with no key allowed: zeros (what the fused kernels give), finite gradients, alike on every
    backend; a 2-D mask, and an fp32 additive mask over bf16 inputs, taken as every backend takes them."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(9, 9) > 0.3
    mask.fill_diagonal_(True)
    mask[4] = False                                                   # query 4 may see nothing
    want, _ = attention(q, k, v, mask, backend="math")
    assert torch.equal(want[:, :, 4], torch.zeros_like(want[:, :, 4]))
    g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    inputs = [t.detach() for t in (q, k, v)] if backend == "flex" else (q, k, v)   # (CPU flex: forward only)
    got, _ = attention(*inputs, mask, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if backend != "flex":
        g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
        for a, b in zip(g_got, g_want):
            assert a.isfinite().all()
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    additive = torch.zeros(9, 9).masked_fill(~mask, float("-inf"))   # fp32, over bf16 inputs
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    out, _ = attention(qb, kb, vb, additive, backend=backend)
    torch.testing.assert_close(out.float(), want.detach(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_model_backends_match_math_forward_and_gradients(backend, patch, pool):
    model = tiny(patch, pool)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])
    loss_ref, g_ref = grads_of(set_attention_backend(model, "math"), x, y)
    loss, g = grads_of(set_attention_backend(model, backend), x, y)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_unavailable_kernel_falls_back_with_one_line_notice(capsys, monkeypatch):
    monkeypatch.setattr(A, "_UNAVAILABLE", set())
    import pixformer.progress as progress
    monkeypatch.setattr(progress, "_SAID", set())
    q = torch.randn(1, 2, 5, 4)
    want, _ = attention(q, q, q, backend="sdpa")
    for _ in range(3):   # CPU has no memory-efficient kernel
        out, _ = attention(q, q, q, backend="efficient")
        torch.testing.assert_close(out, want)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pixformer: attention kernel 'efficient' not available on cpu; falling back to 'sdpa'"]
    assert A.kernel_available("flash", "cpu") and not A.kernel_available("cudnn", "cpu")


@pytest.mark.parametrize("blocks,selective,want", [("all", False, {"full": 2, "selective": 0}),
                                                    (1, False, {"full": 1, "selective": 0}),
                                                    (0, True, {"full": 0, "selective": 2}),
                                                    (1, True, {"full": 1, "selective": 1})])
def test_checkpointed_blocks_give_the_same_gradients(blocks, selective, want):
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])
    plain = tiny(drop_path=0.2)
    torch.manual_seed(1)
    loss_ref, g_ref = grads_of(plain.train(), x, y)
    model = tiny(drop_path=0.2)
    apply_activation_checkpointing(model, blocks, selective)
    assert checkpointed_blocks(model) == want
    assert list(model.state_dict()) == list(plain.state_dict())      # checkpoints stay loadable
    torch.manual_seed(1)                                              # same drop-path draws
    loss, g = grads_of(model.train(), x, y)
    torch.testing.assert_close(loss, loss_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    apply_activation_checkpointing(model, 0)
    assert checkpointed_blocks(model) == {"full": 0, "selective": 0}


def test_checkpointing_bad_input():
    model = tiny()
    for bad in ("some", 3, -1):
        with pytest.raises(PixformerError, match="checkpoint"):
            apply_activation_checkpointing(model, bad)
    convmixer = create_model("convmixer-256/8", img_size=8, dim=8, depth=2)
    with pytest.raises(PixformerError, match="BatchNorm"):
        apply_activation_checkpointing(convmixer, "all")
    apply_activation_checkpointing(convmixer, 0, selective=True)      # left alone, not an error
    assert checkpointed_blocks(convmixer) == {"full": 0, "selective": 0}


def test_checkpointing_saves_what_the_planner_says():
    """Activation memory kept for backward, counted with autograd's saved-tensor hooks, equals the
    planner's per-block count (fp32, fused attention): plain, and with every block checkpointed."""
    def kept_bytes(model, x):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(seen.values())

    x = torch.randn(2, 3, 8, 8)
    T, D, M, H = 65, 32, 128, 2
    for mode, lean in (("none", False), ("none", True), ("full", False), ("full", True)):
        one, two = tiny(depth=1), tiny(depth=2)
        for m in (one, two):
            apply_lean_mlp(m, lean)
            if mode == "full":
                apply_activation_checkpointing(m, "all")
        per_block = kept_bytes(two, x) - kept_bytes(one, x)
        assert per_block == 2 * vit_block_bytes(T, D, M, H, 4, "fused", mode, lean_mlp=lean)[0]
    assert (vit_block_bytes(T, D, M, H, 4, "fused", "none", lean_mlp=False)[0]
            - vit_block_bytes(T, D, M, H, 4, "fused", "none")[0]) == 4 * T * M        # GELU(u) no longer kept


def test_bf16_training_step_runs():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=autocast_dtype("bf16", "cpu")):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float(), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("native", [True, False])
def test_precision_choices(monkeypatch, capsys, native):
    """auto is bf16 where bf16 is native, else fp32; bf16 asked for where it is emulated is said once."""
    monkeypatch.setattr(perf, "native_bf16", lambda device: native)
    monkeypatch.setattr(importlib.import_module("pixformer.progress"), "_SAID", set())
    assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    said = capsys.readouterr().err.splitlines()
    assert said == ([] if native else [next(line for line in said if "emulated" in line)])
    assert native or said[0].startswith("--precision bf16: this CPU (") and "--precision auto trains in fp32" in said[0]
    assert autocast_dtype("bf16", "cpu", quiet=True) is torch.bfloat16       # an estimate's: never said
    monkeypatch.setattr(importlib.import_module("pixformer.progress"), "_SAID", set())
    assert autocast_dtype("bf16", "cpu", quiet=True) is torch.bfloat16 and capsys.readouterr().err == ""
    with pytest.raises(PixformerError, match="fp16"):
        autocast_dtype("fp16", "cpu")
    with pytest.raises(PixformerError, match="precision"):
        autocast_dtype("fp8", "cpu")


@pytest.mark.parametrize("backend", ["sdpa", "blocked"])
def test_compiled_training_step_matches_eager(backend):
    """The compile path (dynamo tracing of the blocks, AOT autograd), through pixformer's custom ops
    too (blocked attention, oneDNN linears); "aot_eager" skips inductor's C++ build, which alone takes
    longer than this whole file."""
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    loss_ref, g_ref = grads_of(set_attention_backend(tiny(depth=1), backend), x, y)
    model = apply_compile(apply_speed_settings(tiny(depth=1), attn_backend=backend), backend="aot_eager")
    assert list(model.state_dict()) == list(tiny(depth=1).state_dict())
    loss, g = grads_of(model, x, y)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_planner_flops_and_tokens_by_hand():
    # ViT: 4x4 image, 2x2 patches -> 4 tokens + cls = 5; width 8, 2 heads, MLP 16, depth 1, 5 classes.
    p = plan("vit-n/2", img_size=4, batch_size=2, memory="1MiB", depth=1, dim=8, heads=2, mlp_ratio=2.0,
             num_classes=5)
    embed = 2 * 4 * (3 * 2 * 2) * 8                     # 4 patches of 12 values -> width 8
    block = 2 * 5 * 8 * (3 * 8 + 8 + 2 * 16) + 2 * 2 * 5 * 5 * 8   # qkv, proj, fc1+fc2; QK^T and AV
    head = 2 * 8 * 5
    assert (p.tokens, p.seq_len) == (4, 5)
    assert p.fwd_flops == embed + block + head == 6_768
    assert p.train_flops == 3 * p.fwd_flops
    assert p.train_flops_full_ckpt == 3 * p.fwd_flops + block
    params = (12 * 8 + 8) + 8 + 4 * 8 + (2 * 8 + 8 * 24 + 24 + 8 * 8 + 8 + 2 * 8 + 8 * 16 + 16 + 16 * 8 + 8) \
        + 2 * 8 + (8 * 5 + 5)
    assert p.params == params
    assert p.fixed_bytes == 16 * params
    per_image = p.image_bytes["none"]
    assert p.peak_bytes(3) == p.fixed_bytes + 3 * per_image
    assert p.max_batch("none") == (2 ** 20 - p.fixed_bytes) // per_image


def test_planner_memory_sizes_and_impossible_budget():
    assert parse_bytes("8GiB") == 8 * 2 ** 30 and parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes("1.5G") == int(1.5 * 2 ** 30) and parse_bytes("2GB") == 2 * 10 ** 9
    with pytest.raises(PixformerError, match="memory size"):
        parse_bytes("lots")
    p = plan("pit-t", img_size=32, batch_size=32, memory="8GiB")
    assert p.image_bytes["full"] < p.image_bytes["selective"] < p.image_bytes["none"]
    assert p.peak_bytes(32) < 8 * 2 ** 30 and "fits" in p.verdict()
    small = plan("pit-t", img_size=64, batch_size=8, memory="50MiB")
    assert small.max_batch("full") == 0
    assert "nothing fits in 50.00 MiB" in small.verdict() and "needs" in small.verdict()
    for batch, memory in ((4096, "2GiB"), (512, "950MiB")):     # too big: micro-batches named, and the
        big = plan("pit-t", img_size=32, batch_size=batch, memory=memory)   # checkpointing they need
        n = -(-batch // big.max_batch("selective"))
        verdict = big.verdict()
        assert n > 1 and f"batch {batch} trains in {n} micro-batches: --accum-steps {n}" in verdict
        micro = -(-batch // n)
        named = "selective" if verdict.endswith("--selective-checkpoint true") else None
        chosen = "selective" if micro * big.image_bytes["none"] > SELECTIVE_ABOVE else "none"   # train's rule
        assert big.peak_bytes(micro, named or chosen) <= parse_bytes(memory)
    assert verdict.endswith("--selective-checkpoint true")      # a micro-batch too small for train to choose it



def test_planner_sequence_and_data_parallel_by_hand():
    """Per rank: a shard of ceil(T/P) tokens plus every block's gathered keys and values; D divides the
    batch, FSDP2 divides the fixed state; ring collectives' volumes as in the module doc."""
    kw = dict(depth=2, dim=8, heads=2, mlp_ratio=2.0, precision="fp32", attn_backend="sdpa")
    one = plan("pit-n", img_size=5, batch_size=4, **kw)                       # 25 tokens + cls = 26
    sp = plan("pit-n", img_size=5, batch_size=4, seq_parallel=2, data_parallel=2, seq_regather="none", **kw)
    Ts, T, D = 13, 26, 8
    kept, work = vit_block_bytes(Ts, D, 16, 2, 4, "fused", "none", keys=T)
    assert kept - vit_block_bytes(Ts, D, 16, 2, 4, "fused", "none")[0] == 4 * 2 * T * D    # gathered K, V
    assert sp.image_bytes["none"] == 2 * kept + work + 4 * Ts * D + 4 * 3 * 25
    assert sp.peak_bytes(4) == sp.fixed_bytes + 2 * sp.image_bytes["none"]    # 2 images a data-parallel group
    assert sp.fixed_bytes == one.fixed_bytes
    assert sp.comm["gradient_all_reduce"] == 2 * 3 * 4 * one.params // 4
    assert sp.comm["key_value_gathers"] == 2 * 2 * 1 * Ts * 2 * D * 4 * 2
    again = plan("pit-n", img_size=5, batch_size=4, seq_parallel=2, data_parallel=2, seq_regather=True, **kw)
    gathered = 4 * 2 * T * D
    assert sp.image_bytes["none"] - again.image_bytes["none"] == 2 * gathered - gathered   # kept by 2 blocks,
    assert again.comm["key_value_gathers"] * 2 == sp.comm["key_value_gathers"] * 3         # once more in backward
    fsdp = plan("pit-n", img_size=5, batch_size=4, data_parallel=4, fsdp=True, **kw)
    assert fsdp.fixed_bytes == one.fixed_bytes // 4
    assert fsdp.comm == {"fsdp_weights_and_gradients": 3 * 3 * 4 * one.params // 4}
    # the longest side grows with P and with checkpointing; one that fits at P is refused at 2 of its tokens
    sides = [largest_side("pit-t", "1GiB", "none", precision="fp32", seq_parallel=P) for P in (1, 2, 4)]
    assert 0 < sides[0] < sides[1] < sides[2]
    assert largest_side("pit-t", "1GiB", "full", precision="fp32") > sides[0]
    big = plan("pit-t", sides[0] + 1, 1, "1GiB", precision="fp32")
    assert big.peak_bytes(1) > 2 ** 30 >= plan("pit-t", sides[0], 1, precision="fp32").peak_bytes(1)
    with pytest.raises(PixformerError, match="cannot be split over 8"):
        plan("pit-n", img_size=2, seq_parallel=8)


def test_planner_chooses_the_layers_that_regather_by_hand():
    """PiT-n, 12 blocks of width 8 (MLP 16, 2 heads), 5x5 + class token = 26 tokens, fp32, fused
    attention, P = 2 (13 tokens a shard), 2 images a rank. Per image, in bytes: a block keeps 6968 with
    the gathered keys and values (1664) and 5304 without; its working set is 2912, or 4576 when it
    gathers them again; 716 stay outside the blocks (the shard's final norm input, the image). One
    device: a block keeps 10608, works in 2496, 1132 outside: 12 * 10608 + 2496 + 1132 = 130924.
    With the first R blocks regathering, the peak is at the last block's backward:
    12 * 6968 - 1664 R + 2912 + 716 = 87244 - 1664 R, at most 1.1 / 2 * 130924 = 72008.2 from R = 10."""
    from pixformer.engine.plan import check_regather
    kw = dict(depth=12, dim=8, heads=2, mlp_ratio=2.0, precision="fp32", attn_backend="sdpa", batch_size=4,
              seq_parallel=2, data_parallel=2, lean_mlp=False)    # the MLP keeps both hidden activations
    auto = plan("pit-n", img_size=5, **kw)
    assert auto.one_device_bytes["none"] == 130924
    assert auto.regather_layers["none"] == 10 and auto.image_bytes["none"] == 87244 - 1664 * 10
    assert auto.regather_layers["full"] == auto.regather_layers["selective"] == 0   # nothing to save: checkpointed
    assert auto.regather_line("selective").startswith(  # blocks recompute the gather (selective: not a matmul)
        "sequence parallel P=2: blocks checkpointed selectively keep no gathered keys/values, their backward "
        "gathers them again (activations ~")
    assert auto.regather_line("selective").endswith("12 more all-gathers of 1.62 KiB a rank a step)")
    assert auto.gather_bytes == 13 * 2 * 8 * 4 * 2    # (P-1) * Ts * 2D * 4 bytes * 2 images
    assert auto.comm["key_value_gathers"] == (2 * 12 + 10) * auto.gather_bytes
    assert auto.regather_line("none") == ("sequence parallel P=2: keys/values kept in 2 of 12 layers, gathered "
                                          "again in 10 (activations ~0.54x of one device's; 10 more all-gathers of "
                                          "1.62 KiB a rank a step)")
    assert auto.regather_line() in str(auto)
    for setting, layers, cost in (("none", 0, 87244), ("all", 12, 87244 - 1664 * 11), (3, 3, 87244 - 1664 * 3),
                                  (True, 12, 87244 - 1664 * 11), ("false", 0, 87244)):
        p = plan("pit-n", img_size=5, **{**kw, "seq_regather": setting})
        assert (p.regather_layers["none"], p.image_bytes["none"]) == (layers, cost), setting
    # regathering in the last block too saves nothing: its backward needs the gathered keys again at the peak
    assert plan("pit-n", img_size=5, **{**kw, "depth": 2}).regather_layers["none"] == 1   # none fits: the least
    with pytest.raises(PixformerError, match="^--seq-regather 13 is more layers than the model's 12$"):
        plan("pit-n", img_size=5, **{**kw, "seq_regather": 13})
    for bad in ("some", -1, "2.5", 1.5):
        with pytest.raises(PixformerError, match="^--seq-regather must be auto, all, none or a number of layers, got"):
            check_regather(bad)


# ---- blocked attention, auto backend ------------------------------------------------------------
@pytest.mark.parametrize("aligned", [False, True])                     # keys padded to a multiple of 8
@pytest.mark.parametrize("budget", [1 << 22, 2 * 17 * 17, 5 * 17, 3])   # whole images, heads, rows, 3 scores
def test_blocked_attention_matches_math_in_every_block_layout(budget, aligned, monkeypatch):
    """Exact in fp64 whether a block holds whole images, some heads of one image, or a few query rows
    (dK and dV then add up over row blocks); with no mask, a boolean mask, an additive one and segment
    ids; with the keys as they are and padded (17 and 13 keys to 24 and 16, the padding masked)."""
    monkeypatch.setattr(A, "BLOCK_ELEMENTS", budget)
    if aligned:
        monkeypatch.setattr(A, "KEY_ALIGN", 8)
        monkeypatch.setattr(A, "KEY_ALIGN_ABOVE", 0)
    torch.manual_seed(0)
    for nq, nk in ((17, 17), (9, 13)):
        q = torch.randn(2, 3, nq, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, 3, nk, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
        keep = torch.rand(nq, nk) > 0.3
        keep[:, 0] = True
        segments = AttnSpec(segment_ids=torch.randint(0, 3, (2, nq)), kv_segment_ids=torch.randint(0, 3, (2, nk)))
        segments.kv_segment_ids[:, :3] = torch.arange(3)                     # every query has keys of its own
        for mask in (None, keep, torch.randn(2, 1, nq, nk, dtype=torch.float64), segments):
            want, _ = attention(q, k, v, mask, backend="math")
            got, _ = attention(q, k, v, mask, backend="blocked")
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
            g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
            g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
            for a, b in zip(g_got, g_want):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_blocked_attention_cuts_its_blocks_evenly(monkeypatch):
    """As few blocks as the budget allows, of equal size: 4 heads with room for 3 go 2 + 2 (a lone last
    head made one slow block), 16 images with room for 5 go 4 x 4, 10 rows with room for 7 go 5 + 5."""
    monkeypatch.setattr(A, "BLOCK_ELEMENTS", 3 * 5 * 5)
    assert A._blocks(1, 4, 5, 5) == [(slice(0, 1), slice(h, h + 2), slice(None)) for h in (0, 2)]
    monkeypatch.setattr(A, "BLOCK_ELEMENTS", 5 * 2 * 3 * 3)
    assert A._blocks(16, 2, 3, 3) == [(slice(b, b + 4), slice(None), slice(None)) for b in (0, 4, 8, 12)]
    monkeypatch.setattr(A, "BLOCK_ELEMENTS", 7 * 10)
    assert A._blocks(1, 1, 10, 10) == [(slice(0, 1), slice(0, 1), slice(r, r + 5)) for r in (0, 5)]


def test_blocked_attention_in_bf16_is_as_close_as_math_and_the_op_checks():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 65, 16) for _ in range(3))
    exact, _ = attention(q.double(), k.double(), v.double(), backend="math")
    err = {}
    for backend in ("math", "blocked"):
        out, _ = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend=backend)
        assert out.dtype == torch.bfloat16
        err[backend] = (out.double() - exact).abs().mean().item()
    assert err["blocked"] < 1.5 * err["math"] + 1e-4
    torch.library.opcheck(torch.ops.pixformer.blocked_attention, (q, k, v, None, None, None))
    torch.library.opcheck(torch.ops.pixformer.blocked_attention, (q, k, v, torch.rand(65, 65) > 0.5, None, None))
    seg = torch.randint(0, 3, (2, 65))
    torch.library.opcheck(torch.ops.pixformer.blocked_attention, (q, k, v, None, seg, seg))


@pytest.mark.parametrize("flash", [False, True])
def test_blocked_attention_in_bf16_with_the_flash_forward(flash, monkeypatch):
    """On CPUs with AMX the blocked op's forward runs torch's flash kernel (full attention, bf16): no
    block is computed in the forward, the output is as close to fp64 as the flash kernel's, and the
    gradients (from the blocks, over 1,100 keys padded to 1,120) as close as math's."""
    monkeypatch.setattr(A, "_amx", lambda: flash)
    calls = []
    block_probs = A._block_probs
    monkeypatch.setattr(A, "_block_probs", lambda *a: calls.append(1) or block_probs(*a))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1100, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    exact, _ = attention(q, k, v, backend="math")
    g_exact = torch.autograd.grad(exact.square().sum(), (q, k, v))
    res = {}
    for backend in ("math", "sdpa", "blocked"):
        qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
        assert A._flash_forward(qb, kb, vb, None, None) == flash
        out, _ = attention(qb, kb, vb, backend=backend)
        forward_blocks = len(calls)
        grads = torch.autograd.grad(out.float().square().sum(), (qb, kb, vb))
        res[backend] = [(out.double() - exact).abs().mean().item()] + \
                       [(g.double() - ge).abs().mean().item() / ge.abs().mean().item() for g, ge in zip(grads, g_exact)]
    assert forward_blocks == (0 if flash else 1) and len(calls) == forward_blocks + 1   # one block each way
    if flash:                                                    # the flash kernel's output, to the bit
        assert res["blocked"][0] == res["sdpa"][0] < res["math"][0]
    else:
        assert res["blocked"][0] < 1.5 * res["math"][0] + 1e-4
    for got, want in zip(res["blocked"][1:], res["math"][1:]):
        assert got < 1.5 * want + 1e-3
    assert not A._flash_forward(qb, kb, vb[..., :8], None, None)                    # another value width
    assert not A._flash_forward(qb, kb.transpose(2, 3).contiguous().transpose(2, 3), vb, None, None)


def test_blocked_attention_op_checks_with_padded_keys(monkeypatch):
    """torch.library.opcheck of the op and its backward with the keys padded (7 to 8, KEY_ALIGN 4), with
    gradients, a mask and segment ids."""
    monkeypatch.setattr(A, "KEY_ALIGN", 4)
    monkeypatch.setattr(A, "KEY_ALIGN_ABOVE", 0)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2]])
    for args in ((None, None, None), (torch.rand(7, 7) > 0.3, None, None), (None, seg, seg)):
        torch.library.opcheck(torch.ops.pixformer.blocked_attention, (q, k, v, *args))
        torch.library.opcheck(torch.ops.pixformer.blocked_attention_backward,
                              (torch.randn(2, 3, 7, 8), q.detach(), k.detach(), v.detach(), *args))


def test_auto_backend_choice():
    assert A.auto_backend("cpu", torch.float32, 10 ** 9) == "sdpa"           # the flash kernel is faster in fp32
    assert A.auto_backend("cuda", torch.bfloat16, 10 ** 9) == "sdpa"
    assert A.auto_backend("cpu", torch.bfloat16, A.AUTO_MATH_SCORES) == "math"
    assert A.auto_backend("cpu", torch.bfloat16, A.AUTO_MATH_SCORES + 1) == "blocked"
    assert A.auto_backend("cpu", torch.float16, 10 ** 9) == "blocked"


def test_selective_checkpointing_keeps_the_blocked_attention_output(monkeypatch):
    """Selective checkpointing saves the blocked op's output: its forward is not run again in the
    backward pass (one block's probabilities in forward, once more in its own backward), and the
    gradients equal those without checkpointing."""
    calls = []
    real = A._block_probs
    monkeypatch.setattr(A, "_block_probs", lambda *a: calls.append(1) or real(*a))
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])
    plain = set_attention_backend(tiny(), "blocked")
    loss_ref, g_ref = grads_of(plain, x, y)
    assert len(calls) == 2 * 2                                         # 2 layers: forward + backward
    calls.clear()
    model = apply_activation_checkpointing(set_attention_backend(tiny(), "blocked"), 0, selective=True)
    loss, g = grads_of(model, x, y)
    assert len(calls) == 2 * 2
    torch.testing.assert_close(loss, loss_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)


# ---- oneDNN linear layers, allocator, speed settings --------------------------------------------
@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_onednn_linear_gives_the_same_forward_and_gradients():
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])
    loss_ref, g_ref = grads_of(tiny(), x, y)
    model = apply_onednn_linear(tiny())
    assert list(model.state_dict()) == list(tiny().state_dict())      # checkpoints stay loadable
    loss, g = grads_of(model, x, y)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):                  # bf16 autocast: plain F.linear
        assert model(x).dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.pixformer.onednn_linear, (torch.randn(4, 5, 6), torch.randn(7, 6), torch.randn(7)))
    torch.library.opcheck(torch.ops.pixformer.onednn_linear, (torch.randn(4, 6), torch.randn(7, 6), None))
    apply_onednn_linear(model, enabled=False)
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("onednn", [False, True] if onednn_available() else [False])
def test_lean_mlp_gives_the_same_forward_and_gradients(onednn):
    """The MLP that recomputes GELU in its backward computes what the plain one does, in fp32 and under
    bf16 autocast, with drop path, alone or under selective checkpointing; its op passes opcheck."""
    def model():                       # a random head: the zero one would send no gradient to the blocks
        m = tiny(drop_path=0.2)
        torch.nn.init.normal_(m.head.weight, generator=torch.Generator().manual_seed(2))
        return m.train()

    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            plain = model()
            torch.manual_seed(1)                                          # the same drop-path draws
            loss_ref, g_ref = grads_of(plain, x, y)
            for selective in (False, True):
                lean = apply_lean_mlp(model(), onednn=onednn)
                apply_activation_checkpointing(lean, 0, selective)
                assert len(lean_mlps(lean)) == 2 and all("forward" in vars(m) for m in lean_mlps(lean))
                assert list(lean.state_dict()) == list(tiny().state_dict())      # checkpoints stay loadable
                torch.manual_seed(1)
                loss, g = grads_of(lean, x, y)
                tol = dict(atol=1e-2, rtol=1e-2) if amp else dict(atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(loss, loss_ref, **tol)
                for name in g_ref:
                    assert g[name].dtype == torch.float32 and (name.startswith("head") or g[name].abs().sum() > 0)
                    torch.testing.assert_close(g[name], g_ref[name], **tol, msg=name)
    u, w, b = torch.randn(4, 5, 8), torch.randn(6, 8), torch.randn(6)
    torch.library.opcheck(torch.ops.pixformer.gelu_linear, (u, w, b, onednn))
    torch.library.opcheck(torch.ops.pixformer.gelu_linear, (u.reshape(20, 8), w, None, onednn))
    apply_lean_mlp(lean, enabled=False)
    assert not any("forward" in vars(m) for m in lean_mlps(lean))
    assert lean_mlps(create_model("convmixer-256/8", img_size=8, dim=8, depth=2)) == []     # no MLP: left alone


def test_train_applies_the_lean_mlp_where_nothing_else_recomputes_gelu():
    def lean(**speed):
        return [("forward" in vars(m)) for m in lean_mlps(apply_speed_settings(tiny(), **speed))]
    assert lean() == [True, True]
    assert lean(lean_mlp=False) == lean(selective_checkpoint=True) == lean(compile=True) == [False, False]
    assert lean(checkpoint_blocks=1) == [True, True]            # a block checkpointed in full keeps nothing of it


def convmixer(kernel=3):
    torch.manual_seed(0)
    return create_model("convmixer-256/8", img_size=8, num_classes=4, dim=8, depth=2, kernel_size=kernel).train()


def test_depthwise_param_grads_counts_the_overlaps_by_hand():
    """Ones in, ones back: each tap's gradient is the number of positions where it meets the image
    (3x3 image, 3x3 kernel, zero padding 1: 4 at the corners, 6 on the edges, 9 in the middle), and the
    bias gradient the number of positions; the same as oneDNN's at kernel 5, in every memory layout."""
    x, dy = torch.ones(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    expected = 2 * torch.tensor([[4.0, 6, 4], [6, 9, 6], [4, 6, 4]])
    dw, db = perf.depthwise_param_grads(x, dy, 3)
    assert torch.equal(dw, expected.view(1, 1, 3, 3)) and db.tolist() == [18.0]
    x = torch.zeros(1, 2, 4, 4)
    x[0, 1, 0, 0] = 1.0                                                   # one pixel, top-left, channel 1
    dy = torch.arange(32.0).view(1, 2, 4, 4)
    g, db = perf.depthwise_param_grads(x, dy, 3)                          # tap (i, j) meets it from dy[1 - i, 1 - j]
    assert g[0].abs().sum() == 0 and g[1, 0].tolist() == [[21.0, 20, 0], [17, 16, 0], [0, 0, 0]]
    assert db.tolist() == [sum(range(16)), sum(range(16, 32))]
    x, dy, w = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(4, 1, 5, 5)    # kernel 5: as oneDNN
    _, ref_w, ref_b = torch.ops.aten.convolution_backward(dy, x, w, [4], [1, 1], [2, 2], [1, 1], False, [0, 0], 4,
                                                          [False, True, True])
    for fmt in (torch.contiguous_format, torch.channels_last):
        dw, db = perf.depthwise_param_grads(x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt), 5)
        torch.testing.assert_close(dw, ref_w)
        torch.testing.assert_close(db, ref_b)


@pytest.mark.parametrize("kernel", [3])          # (each new shape compiles a kernel: one size here, 5 below)
def test_depthwise_grad_gives_the_same_forward_and_gradients(kernel, monkeypatch, capsys):
    """ConvMixer's depthwise convolutions through depthwise_conv2d compute what nn.Conv2d does, in fp32
    and under bf16 autocast, with the batch in one chunk or several, and through oneDNN's gradient where
    the kernel cannot be compiled; the op passes opcheck; only the depthwise convolutions are taken."""
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 3, 2, 1])
    fast = perf.apply_depthwise_grad(convmixer(kernel))
    assert perf.depthwise_convs(fast) == [b.spatial[0] for b in fast.blocks]   # not the stem, not the 1x1s
    assert all("forward" in vars(c) for c in perf.depthwise_convs(fast))
    assert list(fast.state_dict()) == list(convmixer(kernel).state_dict())
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss_ref, g_ref = grads_of(convmixer(kernel), x, y)
            for chunk in (5 * 8 * 4 * 4 * 4, 8 * 4 * 4 * 8):  # the 5 images in one chunk; 2 (fp32) or 4 (bf16) a chunk
                monkeypatch.setattr(perf, "_CHUNK_BYTES", chunk)
                loss, g = grads_of(perf.apply_depthwise_grad(convmixer(kernel)), x, y)
                tol = dict(atol=1e-2, rtol=1e-2) if amp else dict(atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(loss, loss_ref, **tol)
                for name in g_ref:
                    assert g[name].dtype == torch.float32
                    torch.testing.assert_close(g[name], g_ref[name], **tol, msg=name)
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(perf, "_PARAM_GRADS", [no_compiler])             # oneDNN's gradient, after a notice
    monkeypatch.setattr(importlib.import_module("pixformer.progress"), "_SAID", set())   # said once a process
    name = "blocks.0.spatial.0.weight"
    torch.testing.assert_close(grads_of(perf.apply_depthwise_grad(convmixer(kernel)), x, y)[1][name],
                               grads_of(convmixer(kernel), x, y)[1][name])
    assert perf._PARAM_GRADS == [None] and "oneDNN's runs instead" in capsys.readouterr().err
    xs, w, b = torch.randn(2, 4, 6, 6), torch.randn(4, 1, kernel, kernel), torch.randn(4)
    torch.library.opcheck(torch.ops.pixformer.depthwise_conv2d, (xs, w, b),   # (not traced by AOT: its backward
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # compiles)
    perf.apply_depthwise_grad(fast, enabled=False)
    assert not any("forward" in vars(c) for c in perf.depthwise_convs(fast))


def test_depthwise_grad_is_applied_by_train_and_left_to_inductor_under_compile():
    def fast(**speed):
        return ["forward" in vars(c) for c in perf.depthwise_convs(apply_speed_settings(convmixer(), **speed))]
    assert fast() == [True, True]
    assert fast(depthwise_grad=False) == fast(compile=True) == [False, False]
    assert perf.depthwise_convs(tiny()) == []                             # a ViT: nothing to take
    strided = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
    assert perf.depthwise_convs(torch.nn.Sequential(strided, torch.nn.Conv2d(4, 4, 2, padding="same", groups=4))) == []


def test_allocator_policy_names_and_checks():
    with pytest.raises(PixformerError, match="allocator policy must be one of"):
        set_allocator("fast")
    with pytest.raises(PixformerError, match="allocator policy"):
        Speed(allocator="kept").check()
    with pytest.raises(PixformerError, match="unknown attention backend 'flsh'"):
        Speed(attn_backend="flsh").check()
    assert set_allocator("system") is False and set_allocator("auto", memory_first=True) is False


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")      # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(), reason="glibc >= 2.33 malloc")
@pytest.mark.parametrize("policy,mapped", [("release", True), ("keep", False)])
def test_allocator_policy_decides_where_large_tensors_live(policy, mapped):
    """In a fresh process (the policy is process-wide): under release an 8 MiB tensor is a memory map of
    its own, returned when freed; under keep a 64 MiB one comes from the heap, which keeps it."""
    code = f"""
import ctypes, torch
from pixformer.engine.perf import set_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Info
assert set_allocator({policy!r})
before = libc.mallinfo2().hblkhd
t = torch.ones({8 if mapped else 64} << 18)
print(libc.mallinfo2().hblkhd - before >= t.nbytes)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(mapped)


def test_selective_checkpointing_is_on_by_default_only_for_large_steps():
    assert selective_pays("pit-t", 32, 32, precision="bf16")                 # ~2.7 GiB of activations
    assert not selective_pays("pit-t", 8, 32, precision="bf16")              # ~0.2 GiB
    assert not selective_pays("convmixer-256/8", 32, 128)                     # not modelled: left alone
    assert not selective_pays("pit-t", 32, 32, precision="bf16", above=40 << 30)   # a GPU's rule: half its memory


def test_the_selective_threshold_is_1_gib_on_a_cpu_and_half_a_gpus_memory(monkeypatch):
    from types import SimpleNamespace
    assert selective_above("cpu") == SELECTIVE_ABOVE == 1 << 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 << 30))
    assert selective_above("cuda:0") == 40 << 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=1 << 30))
    assert selective_above("cuda") == SELECTIVE_ABOVE                          # never below the CPU's
    settings = apply_speed_settings(tiny(), selective_checkpoint=True, checkpoint_blocks=1)
    assert checkpointed_blocks(settings) == {"full": 1, "selective": 1}


def test_planner_memory_of_each_attention_backend():
    T, D, M, H = 1025, 192, 768, 3
    fused, blocked, math_ = (vit_block_bytes(T, D, M, H, 2, a, "none")[0] for a in ("fused", "blocked", "math"))
    assert fused - blocked == 4 * H * T                                  # no log-sum-exp kept
    assert math_ - blocked == 2 * H * T * T                              # the probabilities
    assert plan("pit-t", 32, 32, precision="fp32").attn == "fused"      # auto: SDPA in fp32
    assert plan("pit-t", 32, 32, precision="bf16").attn == "blocked"    # 100 M scores a layer
    assert plan("pit-t", 8, 32, precision="bf16").attn == "math"        # 0.4 M scores a layer
    assert plan("pit-t", 32, precision="bf16").attn == "blocked"        # no batch: what large batches get
    with pytest.raises(PixformerError, match="unknown attention backend"):
        plan("pit-t", 32, 32, attn_backend="fast")


def test_lean_norms_recompute_the_norms_outputs_bit_for_bit_and_keep_less():
    """Blocks whose norms' outputs are recomputed in the backward give the plain blocks' loss and gradients
    exactly (fp32 with oneDNN or not, bf16 autocast over an fp32 or a bf16 residual stream, DiT's
    modulated norms, with the lean MLP); each block keeps 2 x tokens x width values less, as the planner
    counts; checkpointed blocks, other saved-tensor hooks and evaluation are left alone."""
    from torch.utils.checkpoint import checkpoint

    from pixformer.engine.perf import apply_lean_norms, lean_norm_blocks
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])

    def model(**kw):
        m = tiny(**kw)
        torch.nn.init.normal_(m.head.weight, generator=torch.Generator().manual_seed(2))
        return m.train()

    for amp, onednn in ((False, False), (False, True), (True, False)):
        plain, lean = model(), apply_lean_norms(model())
        for m in (plain, lean):
            apply_onednn_linear(m, onednn)
            apply_lean_mlp(m, onednn=onednn)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            (loss_ref, g_ref), (loss, g) = grads_of(plain, x, y), grads_of(lean, x, y)
        assert torch.equal(loss, loss_ref) and all(torch.equal(g[k], g_ref[k]) for k in g_ref)
    # DiT's conditioned blocks, bf16 residual stream under autocast
    from pixformer.models.dit import DiT, DiTConfig
    dits = []
    for lean_on in (False, True):
        torch.manual_seed(0)
        d = DiT(DiTConfig(img_size=(8, 8), patch_size=2, in_chans=4, depth=2, dim=32, heads=2, num_classes=3))
        for p in d.parameters():
            torch.nn.init.normal_(p, std=0.1)
        dits.append(apply_lean_norms(d, lean_on))
    z, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    outs, recipes, pack = [], [], perf._pack
    for d in dits:
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
            mp.setattr(perf, "_pack", lambda table, t: recipes.append(pack(table, t)) or recipes[-1])
            out = d(z, t, c)
        out.float().square().sum().backward()
        outs.append((out, {k: p.grad for k, p in d.named_parameters()}))
    assert torch.equal(outs[0][0], outs[1][0]) and all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])
    assert sum(isinstance(r, perf._Recompute) for r in recipes) == 2 * 2      # each block's qkv and fc1 inputs

    # what a block keeps (fp32, two images, the lean MLP): the tensors perf's hooks let autograd keep
    kept, pack = [], perf._pack

    def counting(table, t):
        r = pack(table, t)
        if isinstance(r, torch.Tensor):
            kept.append(r)
        return r

    def kept_bytes(m):
        kept.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(perf, "_pack", counting)
            m(x[:2])
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept
                    if t.untyped_storage().data_ptr() not in params}.values())
    T, D, M, H = 65, 32, 128, 2
    one, two = (apply_lean_norms(apply_lean_mlp(model(depth=n))) for n in (1, 2))
    assert kept_bytes(two) - kept_bytes(one) == 2 * vit_block_bytes(T, D, M, H, 4, "fused", "none", lean_norms=True)[0]
    assert (vit_block_bytes(T, D, M, H, 4, "fused", "none")[0]
            - vit_block_bytes(T, D, M, H, 4, "fused", "none", lean_norms=True)[0]) == 2 * 4 * T * D
    # left alone: checkpointed blocks, other hooks, no gradients
    m = apply_lean_norms(apply_activation_checkpointing(model(), 1, True))
    assert [vars(b)["forward"].func for b in lean_norm_blocks(m)] == [checkpoint, checkpoint]
    assert checkpointed_blocks(m) == {"full": 1, "selective": 1}
    m = apply_lean_norms(model())
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss, g = grads_of(m, x, y)
    loss_ref, g_ref = grads_of(model(), x, y)
    assert torch.equal(loss, loss_ref)
    with torch.no_grad():
        assert torch.equal(m(x), model()(x))
    apply_lean_norms(m, enabled=False)
    assert not any("forward" in vars(b) or "_lean_handle" in vars(b.norm1) for b in lean_norm_blocks(m))
