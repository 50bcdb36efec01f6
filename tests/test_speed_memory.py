"""Attention backends against the math oracle, activation checkpointing, bf16 / compile training
steps, and the cost planner against hand-computed numbers."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from pixformer import PixformerError, attention, create_model, set_attention_backend
from pixformer.attention import available_backends
from pixformer.perf import apply_activation_checkpointing, apply_compile, autocast_dtype, checkpointed_blocks
from pixformer.plan import parse_bytes, plan, vit_block_bytes

A = importlib.import_module("pixformer.attention")  # the module (the package exports a function of that name)
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
    monkeypatch.setattr(A, "_NOTICED", set())
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
    for mode in ("none", "full"):
        one, two = tiny(depth=1), tiny(depth=2)
        if mode == "full":
            apply_activation_checkpointing(one, "all"), apply_activation_checkpointing(two, "all")
        per_block = kept_bytes(two, x) - kept_bytes(one, x)
        assert per_block == 2 * vit_block_bytes(T, D, M, H, 4, "fused", mode)[0]


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


def test_precision_choices():
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(PixformerError, match="fp16"):
        autocast_dtype("fp16", "cpu")
    with pytest.raises(PixformerError, match="precision"):
        autocast_dtype("fp8", "cpu")


def test_compiled_training_step_matches_eager():
    """The compile path (dynamo tracing of the blocks, AOT autograd); "aot_eager" skips inductor's
    C++ build, which alone takes longer than this whole file (benchmarks/train_step.py runs inductor)."""
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    loss_ref, g_ref = grads_of(tiny(depth=1), x, y)
    model = apply_compile(tiny(depth=1), backend="aot_eager")
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
