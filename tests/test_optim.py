"""The optimizers (AdamW, LAMB, Muon + AdamW), the learning-rate schedules and progressive resizing:
hand-computed steps and values, short runs that learn and resume exactly, and one-line refusals."""
import json
import math

import pytest
import torch

from pixformer import PixformerError, TrainConfig, create_model, train
from pixformer.engine.optim import Lamb, Optimizers, StackedMuon, build_optimizer, lr_at, param_groups
from pixformer.engine.progressive import resized, side_at
from pixformer.engine.runtime import Runtime

TINY = dict(model="vit-n/2", data="digits", model_args=dict(depth=1, dim=16, heads=2), batch_size=32,
            train_subset=192, epochs=2, progress=False, precision="fp32", lr=3e-3)   # 6 steps an epoch


# ---- LAMB and Muon -------------------------------------------------------------------------
def test_lamb_step_by_hand():
    """Step 1: Adam's bias-corrected update is g / (|g| + eps), i.e. sign(g); with decay 0.5 the update
    is sign(g) + 0.5 w = [[2, 1], [1, 2]], norm sqrt(10), and ||w|| = sqrt(40): trust ratio 2, so
    w <- w - 0.1 * 2 * update. A group without decay takes Adam's step, unscaled."""
    w = torch.tensor([[2.0, 4.0], [4.0, 2.0]], requires_grad=True)
    b = torch.tensor([[2.0, 4.0], [4.0, 2.0]], requires_grad=True)
    opt = Lamb([{"params": [w], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    w.grad = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    b.grad = torch.tensor([[3.0, -3.0], [0.0, 1.0]])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[1.6, 3.8], [3.8, 1.6]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.detach(), torch.tensor([[1.9, 4.1], [4.0, 1.9]]), atol=1e-5, rtol=0)
    zero = torch.zeros(2, 2, requires_grad=True)                 # ||w|| = 0: trust ratio 1
    opt = Lamb([zero], lr=0.1, weight_decay=0.5)
    zero.grad = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    opt.step()
    torch.testing.assert_close(zero.detach(), torch.tensor([[-0.1, 0.1], [0.1, -0.1]]), atol=1e-5, rtol=0)


def test_adamw_is_torchs_fused_kernel_and_steps_as_its_default():
    model = create_model("vit-n/2", img_size=8, num_classes=10, depth=2, dim=16, heads=2)
    twin = create_model("vit-n/2", img_size=8, num_classes=10, depth=2, dim=16, heads=2)
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    twins = dict(zip(model.parameters(), twin.parameters()))
    groups = [{**{k: v for k, v in g.items() if k not in ("fused", "foreach")}, "params": [twins[p] for p in g["params"]]}
              for g in opt.param_groups]                                # the same groups over the twin
    ref = torch.optim.AdamW(groups, foreach=False, fused=False)     # torch's one-tensor-at-a-time step
    assert not any(g["fused"] or g["foreach"] for g in ref.param_groups)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_a_state_saved_with_foreach_resumes_on_the_fused_kernel():
    model = create_model("vit-n/2", img_size=8, num_classes=10, depth=1, dim=16, heads=2)
    old = torch.optim.AdamW(param_groups(model, TrainConfig().weight_decay), lr=1e-3, foreach=True)   # as saved before
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    old.step()
    opt = build_optimizer(model, TrainConfig(optimizer="adamw"))
    Runtime.create("cpu").load_optimizer(model, opt, old.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    p = next(model.parameters())
    assert torch.equal(opt.state[p]["exp_avg"], old.state[p]["exp_avg"])
    opt.step()                                                          # the fused kernel takes the state


def test_muon_for_the_blocks_matrices_adamw_for_the_rest_one_state_dict():
    model = create_model("vit-n/2", img_size=8, num_classes=10, depth=2, dim=16, heads=2)
    opt = build_optimizer(model, TrainConfig(optimizer="muon", layer_decay=0.5))
    names = {id(p): n for n, p in model.named_parameters()}
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    assert isinstance(muon, StackedMuon) and isinstance(adamw, torch.optim.AdamW)
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert on_muon == {f"blocks.{i}.{m}.weight" for i in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert on_adamw == set(names.values()) - on_muon
    assert {"patch_embed.weight", "head.weight", "pos_table", "cls_token", "blocks.0.attn.qkv.bias"} <= on_adamw
    # weight decay by role and layer-wise lr decay survive the split: block 0 of 2 at 0.5^2, block 1 at 0.5
    scale = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert scale["blocks.0.mlp.0.weight"] == (0.25, 0.05) and scale["blocks.1.mlp.0.weight"] == (0.5, 0.05)
    assert scale["patch_embed.weight"] == (0.125, 0.05) and scale["pos_table"] == (0.125, 0.0)
    assert scale["head.weight"] == (1.0, 0.05) and scale["blocks.1.norm1.weight"] == (0.5, 0.0)
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    # one state dict, numbered over both optimizers' parameters, and loaded back into each
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(names)))
    assert "momentum_buffer" in sd["state"][0] and "exp_avg" in sd["state"][len(on_muon)]
    again = build_optimizer(model, TrainConfig(optimizer="muon", layer_decay=0.5))
    again.load_state_dict(sd)
    for a, b in zip(opt.optimizers, again.optimizers):
        for p in model.parameters():
            for k, v in a.state.get(p, {}).items():
                assert torch.equal(v, b.state[p][k]), k


@pytest.mark.parametrize("nesterov, adjust", [(True, "match_rms_adamw"), (False, None)])
def test_stacked_muon_steps_as_torchs_muon(nesterov, adjust):
    """The stacked Newton-Schulz iteration (one batched call per shape; a tall matrix turned wide as a
    transposed view, as torch turns it), in bf16 as torch's, gives torch's Muon's parameters and momentum
    buffers, over steps with weight decay and two groups, bit for bit; a matrix without a gradient is left
    alone by both."""
    shapes = [(8, 16), (16, 8), (8, 16), (12, 12), (12, 12), (20, 6)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    mine = [w.clone().requires_grad_() for w in start]
    theirs = [w.clone().requires_grad_() for w in start]

    def groups(ps):
        return [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0, "lr": 0.02}]
    opts = [StackedMuon(groups(mine), lr=0.05, nesterov=nesterov, adjust_lr_fn=adjust, ns_dtype=torch.bfloat16),
            torch.optim.Muon(groups(theirs), lr=0.05, nesterov=nesterov, adjust_lr_fn=adjust)]
    g = torch.Generator().manual_seed(99)
    for _ in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for ps in (mine, theirs):
            for i, (p, grad) in enumerate(zip(ps, grads)):
                p.grad = None if i == 4 else grad.clone()
        for opt in opts:
            opt.step()
    for i, (a, b, w) in enumerate(zip(mine, theirs, start)):
        assert torch.equal(a, b)
        if i == 4:                                               # never had a gradient: untouched, no state
            assert a.equal(w) and not opts[0].state[a]
        else:
            assert opts[0].state[a]["momentum_buffer"].equal(opts[1].state[b]["momentum_buffer"])
    assert not mine[0].equal(start[0])


@pytest.mark.parametrize("native", [True, False])
def test_stacked_muon_iterates_in_bf16_only_where_the_device_computes_it_natively(monkeypatch, native):
    """By default the iteration runs in bf16 (torch's) where bf16 products are native, and in fp32 where
    they are emulated (a CPU without AVX512-BF16 or AMX: many times slower than fp32 there)."""
    import pixformer.engine.optim as optim
    monkeypatch.setattr(optim, "native_bf16", lambda device: native)
    start = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    ends = {}
    for name, dtype in (("default", None), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        w = start.clone().requires_grad_()
        w.grad = grad.clone()
        StackedMuon([w], lr=0.05, ns_dtype=dtype).step()
        ends[name] = w.detach()
    assert not ends["bf16"].equal(ends["fp32"])
    assert ends["default"].equal(ends["bf16" if native else "fp32"])


def test_muon_updates_a_filter_bank_as_its_matrix_and_refuses_a_model_without_any():
    """ConvMixer under Muon: the blocks' filters (pointwise and depthwise) are Muon's, each (out, in, k, k)
    bank stepped as torch's Muon steps the out x (in*k*k) matrix; the stem, biases, norms and head are
    AdamW's (under --fsdp too: test_distributed). A model whose blocks hold no matrix is one line."""
    model = create_model("convmixer-16/2", img_size=8, num_classes=10, patch_size=2, kernel_size=3)
    muon, _ = build_optimizer(model, TrainConfig(optimizer="muon")).optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for g in muon.param_groups for p in g["params"]} == {
        f"blocks.{i}.{part}.0.weight" for i in (0, 1) for part in ("spatial", "channel")}
    for shape in ((6, 4, 3, 3), (12, 1, 3, 3)):            # a wide bank (pointwise-like) and a tall one (depthwise)
        start = torch.randn(shape)
        bank, matrix = start.clone().requires_grad_(), start.flatten(1).clone().requires_grad_()
        opts = [StackedMuon([bank], lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.bfloat16),
                torch.optim.Muon([matrix], lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")]
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            grad = torch.randn(shape, generator=g)
            bank.grad, matrix.grad = grad.clone(), grad.flatten(1).clone()
            for opt in opts:
                opt.step()
        assert torch.equal(bank.flatten(1), matrix) and not bank.equal(start), shape
    with pytest.raises(ValueError, match="not vectors"):
        StackedMuon([torch.zeros(3, requires_grad=True)])
    flat = create_model("convmixer-16/1", img_size=8, num_classes=10, patch_size=2, kernel_size=3, depth=0)
    with pytest.raises(PixformerError, match="--optimizer muon updates the weight matrices .* use --optimizer adamw"):
        build_optimizer(flat, TrainConfig(optimizer="muon"))


# ---- schedules -----------------------------------------------------------------------------
def test_schedules_at_hand_picked_steps():
    # 100 steps, 10 of warm-up, peak 1, floor 0.1
    at = lambda s, shape: lr_at(s, 100, 10, 1.0, 0.1, shape)   # noqa: E731
    for shape in ("cosine", "linear"):
        assert at(0, shape) == pytest.approx(0.1) and at(9, shape) == pytest.approx(1.0)   # linear warm-up
        assert at(100, shape) == pytest.approx(0.1)
    assert at(55, "cosine") == pytest.approx(0.55)      # half-way down the cosine: (1 + 0.1) / 2
    assert at(55, "linear") == pytest.approx(0.55)
    assert at(32.5, "cosine") == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert at(32.5, "linear") == pytest.approx(1 - 0.9 / 4)
    assert at(0, "one-cycle") == pytest.approx(1 / 25)  # from lr / 25 ...
    assert at(9, "one-cycle") == pytest.approx(1.0)     # ... up to the peak at the warm-up's last step
    assert at(54, "one-cycle") == pytest.approx(0.55)   # half-way from step 9 to step 99
    assert at(99, "one-cycle") == pytest.approx(0.1)


def test_one_cycle_is_torchs_one_cycle_lr():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2.0, total_steps=50, pct_start=0.2,
                                                final_div_factor=(2.0 / 25) / 0.01, cycle_momentum=False)
    for step in range(50):
        assert lr_at(step, 50, 10, 2.0, 0.01, "one-cycle") == pytest.approx(opt.param_groups[0]["lr"]), step
        opt.step()
        sched.step()


# ---- progressive resizing ------------------------------------------------------------------
def test_side_per_epoch_and_the_resize():
    assert [side_at([16, 24, 32], e, 6) for e in range(6)] == [16, 16, 24, 24, 32, 32]
    assert [side_at([8, 16], e, 3) for e in range(3)] == [8, 8, 16]
    assert side_at(None, 0, 3) is None
    images = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    images[..., 2:] = 255                                   # left half black, right half white
    # 4 -> 2 antialiased bilinear: output column 0 (centre 0.5) weighs input columns 0, 1, 2 as
    # 0.75, 0.75, 0.25 (a triangle twice as wide), so it is 255 * 0.25 / 1.75 = 36.4
    out = resized(images, 2)
    assert out.dtype == torch.uint8 and out[0, 0].tolist() == [[36, 219], [36, 219]]
    assert resized(images, 4) is images and resized(images, None) is images


@pytest.mark.parametrize("settings, message", [
    (dict(progressive=[8, 16]), "--progressive must be given with --img-size"),
    (dict(progressive=[8, 16], img_size=32), "ending at --img-size 32"),
    (dict(progressive=[8, 32, 16], img_size=16), "none larger"),
    (dict(progressive=[4, 8, 16], img_size=16, epochs=2), r"at most one per epoch \(2\)"),
])
def test_bad_progressive_settings_are_one_line(settings, message):
    with pytest.raises(PixformerError, match=message):
        TrainConfig(**settings)


@pytest.mark.parametrize("settings, message", [
    (dict(model="vit-n/4", img_size=16, progressive=[6, 12, 16], epochs=3), r"side\(s\) \[6\] are not multiples "
                                                                            r"of vit-n/4's patch size 4"),
    (dict(img_size=16, progressive=[8, 16], permute_pixels=True), "a pixel permutation is fixed"),
    (dict(img_size=8, progressive=[4, 8], max_side=8), "images keep their own sizes at native resolution"),
    (dict(model="dit-n/2", task="diffusion", img_size=16, progressive=[8, 16], task_args=dict(latent_vae="vae")),
     "latent diffusion trains on the VAE's latents"),
    (dict(model="vit-n/4", task="mae", img_size=16, progressive=[4, 16], epochs=2),
     "--progressive: at side 4, mask ratio 0.75 leaves no visible token of 1; lower --mask-ratio"),
])
def test_progressive_refuses_what_cannot_resize_before_any_work(settings, message, tmp_path):
    with pytest.raises(PixformerError, match=message):
        train(TrainConfig(**{**TINY, **settings}, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


# ---- runs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, lr, val_loss", [("adamw", 3e-3, 1.6), ("lamb", 0.1, 2.2), ("muon", 3e-3, 1.6)])
def test_a_short_run_with_each_optimizer_learns(optimizer, lr, val_loss, tmp_path):
    """80 steps on digits. LAMB's steps are relative to each weight's norm, so the zero-initialised
    classifier grows by about lr of itself a step: it wants a larger --lr, and still learns slower here
    (validation loss 2.01 with torch 2.13, 2.12 with 2.11, against 1.23-1.29 for AdamW and Muon; at
    --lr 0.2 or more it diverged in some runs)."""
    out = tmp_path / "run"
    result = train(TrainConfig(**{**TINY, "model": "vit-n/4", "model_args": dict(depth=1, dim=32, heads=2),
                                  "train_subset": None, "optimizer": optimizer, "lr": lr}, out=str(out)))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"] and result["val_loss"] < val_loss < math.log(10)


@pytest.mark.parametrize("settings", [
    dict(optimizer="lamb"),
    dict(optimizer="muon", lr_schedule="one-cycle"),
    dict(optimizer="adamw", lr_schedule="linear", img_size=16, progressive=[8, 16]),
], ids=["lamb", "muon-one-cycle", "adamw-linear-progressive"])
def test_a_run_resumes_exactly(settings, tmp_path, resumes_exactly):
    run = {**TINY, **settings}
    resumes_exactly(run, train(TrainConfig(**run, out=str(tmp_path / "full"))))


def test_progressive_trains_each_epoch_at_its_side_and_evaluates_at_img_size(tmp_path, monkeypatch):
    import pixformer.engine.loop as loop
    trained, evaluated = {}, set()
    real_train, real_eval = loop.train_batch, loop.eval_batch
    monkeypatch.setattr(loop, "train_batch", lambda run, step: trained.setdefault(step, real_train(run, step)))
    monkeypatch.setattr(loop, "eval_batch", lambda *a: evaluated.add(real_eval(*a).x.shape[-1]) or real_eval(*a))
    train(TrainConfig(**{**TINY, "epochs": 3, "img_size": 16, "progressive": [8, 16]}, out=str(tmp_path / "run")))
    assert [trained[s].x.shape[-1] for s in range(18)] == [8] * 12 + [16] * 6     # epochs 0, 1 at 8; epoch 2 at 16
    assert evaluated == {16}


def test_help_names_the_optimizers_and_schedules_beside_diffusions_noise_schedule():
    from pixformer.cli import build_parser
    train_parser = build_parser()._subcommands_action.choices["train"]
    helps = {o: a.help for a in train_parser._actions for o in a.option_strings}
    assert all(v in helps["--optimizer"] for v in ("adamw", "lamb", "muon"))
    assert all(v in helps["--lr_schedule"] for v in ("cosine", "linear", "one-cycle"))
    assert "beta schedule" in helps["--schedule"] and "[diffusion]" in helps["--schedule"]   # the task's own


def test_a_run_saved_before_these_settings_existed_resumes_with_their_defaults(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1}, out=str(out)))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    for name in ("optimizer", "lr_schedule", "progressive"):
        del state["train_config"][name]
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    assert train(TrainConfig.from_run(str(out), resume=True))["step"] == 6
    with pytest.raises(PixformerError, match=r"optimizer: adamw -> lamb"):
        train(TrainConfig.from_run(str(out), resume=True, optimizer="lamb"))
