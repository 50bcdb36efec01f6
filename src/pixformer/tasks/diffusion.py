"""Diffusion: Gaussian diffusion with a DiT (models/dit.py computes), DiT's recipe at any patch size.

The task owns the noise: a 1,000-step schedule (linear beta 1e-4..0.02, or cosine), timesteps drawn
uniformly per image, q(x_t | x_0) from diffusers' DDPMScheduler, epsilon-prediction with a mean
squared error, and with a model built with `learn_sigma` DiT's hybrid loss (the variational bound
on the learned variance, with the mean's gradient stopped, as in improved DDPM). Class labels are
replaced by the null class with probability `class_dropout`, so one model samples with
classifier-free guidance. Images enter the model on the -1..1 scale.

Flow matching (`process flow`, JiT's recipe): the rectified-flow path z_t = t x + (1 - t) eps (t = 0 the
noise, scaled by `noise_scale`; t = 1 the image), t drawn logit-normal (or uniform) per image. The
network predicts eps, v (= dz/dt) or x (`prediction`); the loss compares the output and the truth both
converted to `loss_space` (JiT: x predicted, v compared, each division by 1 - t clamped at `t_clamp`),
with one conversion function per process (gaussian_convert, flow_convert) that the loss and the
samplers share. The Gaussian process takes every prediction too (the schedulers step with its eps).

Latent space (`latent_vae`, as in DiT and the PiT paper): a diffusers AutoencoderKL from a local folder
encodes every split once (the latent means times the VAE's scaling factor, 0.18215 for the Stable
Diffusion VAE), cached on disk; the DiT trains on that grid (flips are applied to the latents), and
samples are decoded back to pixels.

Sampling uses diffusers' schedulers (pixformer writes only what they lack: guidance, the learned
variance loss, the loop): `ddpm` (respaced ancestral sampling, as DiT), `ddim` (with eta) and
`dpm-solver` (DPM-Solver++, 2nd order, 20-50 steps suffice); the flow's ODE by diffusers' flow-matching
`euler` and `heun` schedulers. Guidance may apply only for t in an interval (`cfg_interval`). Every
epoch writes a grid of samples of the evaluated (EMA) model from a fixed seed to RUN/samples/epochNNN.png.

diffusers is an optional dependency: pip install -e '.[diffusion]' in the pixformer checkout.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.sources import cache_dir
from ..data.store import ImageSet
from ..errors import PixformerError, install_hint
from ..models.registry import create_model, resolve
from ..settings import check_fields, require
from .base import Task
from .figures import grid_captions, grid_columns, image_grid

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}   # ours -> diffusers' beta_schedule
PROCESSES = ("gaussian", "flow")
PREDICTIONS = ("eps", "v", "x")
SAMPLERS_OF = {"gaussian": ("ddpm", "ddim", "dpm-solver"), "flow": ("euler", "heun")}
SAMPLERS = SAMPLERS_OF["gaussian"] + SAMPLERS_OF["flow"]
FLOW_TIME = 1000    # flow time t in [0, 1] enters the DiT as 1000 t: the range its timestep sinusoid was made for


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise PixformerError(f"diffusion needs diffusers: {install_hint('diffusion')}") from None
    return diffusers


@dataclass
class DiffusionConfig:
    process: str = "gaussian"           # gaussian (DDPM's noise schedules, DiT) | flow (rectified flow
                                        # z_t = t x + (1 - t) eps, t = 0 noise .. 1 image, JiT)
    prediction: str | None = None       # what the network outputs: eps (the noise) | v (the velocity) | x (the
                                        # clean image); default eps (gaussian), x (flow, JiT)
    loss_space: str | None = None       # eps | v | x: what the mean squared error compares, both sides converted
                                        # from the prediction; default the prediction (gaussian), v (flow, JiT)
    t_sampling: str = "logit-normal"    # flow: training t drawn logit-normal (sigmoid of N(t_mean, t_std)) or uniform
    t_mean: float = -0.8                # flow: mean of the logit-normal t (JiT: -0.8)
    t_std: float = 0.8                  # flow: standard deviation of the logit-normal t (JiT: 0.8)
    t_clamp: float = 0.05               # flow: the 1 - t (or t) a conversion divides by is at least this (JiT: 0.05)
    noise_scale: float = 1.0            # flow: standard deviation of the noise (JiT: 2 at 512 px)
    schedule: str = "linear"            # beta schedule: linear (1e-4 .. 0.02, DiT) or cosine (improved DDPM)
    timesteps: int = 1000               # diffusion steps in training
    conditional: bool = True            # class-conditional (with a null class for guidance) or unconditional
    class_dropout: float = 0.1          # probability a label is replaced by the null class in training
    clip_denoised: bool = True          # clip predicted x_0 to -1..1 when sampling (pixel space)
    sampler: str | None = None          # sampler of the per-epoch grid (and `pixformer sample`'s default): gaussian
                                        # ddpm | ddim | dpm-solver (default ddim), flow euler | heun (default heun)
    sample_steps: int = 50              # sampling steps of the per-epoch grid (and `pixformer sample`'s default)
    cfg_scale: float = 1.5              # guidance of the per-epoch grid (1 = none; DiT's FID setting is 1.5)
    cfg_interval: tuple[float, float] | None = None  # guidance only for t in [LO, HI] (t: 0 noise .. 1 image;
                                        # gaussian t = 1 - timestep / (timesteps - 1)); default: at every t
    samples: int = 16                   # images in each epoch's grid (0: no grid)
    latent_vae: str | None = None       # a local folder with a diffusers AutoencoderKL: train on its latents

    def __post_init__(self):
        check_fields(self)                                          # types; every float finite
        require("samples", self.samples, self.samples >= 0, "at least 0")
        require("process", self.process, self.process in PROCESSES, f"one of {' | '.join(PROCESSES)}")
        flow = self.process == "flow"
        self.prediction = self.prediction or ("x" if flow else "eps")
        self.loss_space = self.loss_space or ("v" if flow else self.prediction)
        for name in ("prediction", "loss_space"):
            require(name, getattr(self, name), getattr(self, name) in PREDICTIONS, f"one of {' | '.join(PREDICTIONS)}")
        require("t_sampling", self.t_sampling, self.t_sampling in ("logit-normal", "uniform"), "logit-normal | uniform")
        require("t_std", self.t_std, self.t_std > 0, "> 0")
        require("t_clamp", self.t_clamp, 0 < self.t_clamp < 1, "in (0, 1)")
        require("noise_scale", self.noise_scale, self.noise_scale > 0, "> 0")
        require("noise_scale", self.noise_scale, flow or self.noise_scale == 1, "1 with the gaussian process "
                "(its schedule fixes the noise; --noise-scale is the flow's)")
        self.sampler = self.sampler or ("heun" if flow else "ddim")
        if self.schedule not in SCHEDULES:
            raise PixformerError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.timesteps < 2:
            raise PixformerError(f"timesteps must be at least 2, got {self.timesteps}")
        if not 0 <= self.class_dropout < 1:
            raise PixformerError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        check_sampler(self.sampler, self.sample_steps, self.timesteps, self.process)
        check_interval(self.cfg_interval)


def check_sampler(sampler: str, steps: int, timesteps: int, process: str = "gaussian") -> None:
    if sampler not in SAMPLERS:
        raise PixformerError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler not in SAMPLERS_OF[process]:
        raise PixformerError(f"sampler {sampler} does not sample the {process} process; it samples with "
                             f"{' | '.join(SAMPLERS_OF[process])}")
    if process == "gaussian" and not 1 <= steps <= timesteps:
        raise PixformerError(f"sampling steps must be between 1 and the {timesteps} training steps, got {steps}")
    if steps < 1:
        raise PixformerError(f"sampling steps must be at least 1, got {steps}")


def check_interval(interval) -> None:
    """A guidance interval: None (guidance at every t) or LO <= HI, both in [0, 1]."""
    if interval is not None and not (len(interval) == 2 and 0 <= interval[0] <= interval[1] <= 1):
        raise PixformerError(f"--cfg-interval must be LO HI with 0 <= LO <= HI <= 1 (t: 0 noise .. 1 image), "
                             f"got {list(interval)}")


def in_interval(t: float, interval) -> bool:
    """Whether guidance applies at t (0 noise .. 1 image): always without an interval."""
    return interval is None or interval[0] <= t <= interval[1]


def gaussian_convert(kind: str, out: Tensor, z: Tensor, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """The Gaussian process z = a x + b eps (a = sqrt(abar), b = sqrt(1 - abar)): a network output of
    `kind` (eps | v | x) -> eps, v (= a eps - b x, Salimans & Ho) and x; the output itself unchanged."""
    if kind == "eps":
        eps = out
        x = (z - b * eps) / a
    elif kind == "x":
        x = out
        eps = (z - a * x) / b
    else:
        x, eps = a * z - b * out, b * z + a * out
    v = out if kind == "v" else a * eps - b * x
    return {"eps": eps, "v": v, "x": x}


def flow_convert(kind: str, out: Tensor, z: Tensor, t: Tensor, clamp: float) -> dict[str, Tensor]:
    """The flow z = t x + (1 - t) eps: a network output of `kind` (eps | v | x) -> eps, v (= dz/dt = x - eps)
    and x, each division by 1 - t (from x) or t (from eps) clamped to at least `clamp` (JiT); the output
    itself unchanged."""
    if kind == "x":
        d = (1 - t).clamp_min(clamp)
        return {"x": out, "v": (out - z) / d, "eps": (z - t * out) / d}
    if kind == "eps":
        d = t.clamp_min(clamp)
        return {"eps": out, "v": (z - out) / d, "x": (z - (1 - t) * out) / d}
    return {"v": out, "x": z + (1 - t) * out, "eps": z - t * out}


class Diffusion(Task):
    name = "diffusion"
    Config = DiffusionConfig
    best = ("loss", "min")
    architectures = ("dit",)
    choices = {"sampler": tuple(SAMPLERS), "schedule": tuple(SCHEDULES)}

    def __init__(self, cfg: DiffusionConfig, facts):
        super().__init__(cfg, facts)
        self.latent = LatentSpace(cfg.latent_vae, facts) if cfg.latent_vae else None
        self.noise = self.scheduler("ddpm")                               # q(x_t | x_0), betas, alphas
        betas = self.noise.betas.double()
        abar = torch.cumprod(1 - betas, 0)                                # in float64 (diffusers': float32)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        # float64 tables of the posterior q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, post_var), per t
        self.tables = {
            "abar": abar, "betas": betas, "post_var": post_var,
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),  # t = 0 clipped, as in DDPM
            "c0": betas * abar_prev.sqrt() / (1 - abar),
            "ct": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        }

    @classmethod
    def encoded(cls, cfg: DiffusionConfig) -> str | None:
        return "latent diffusion trains on the VAE's latents" if cfg.latent_vae else None

    # ---- the model and its inputs ----------------------------------------------------------
    def build_model(self, name: str, model_args: dict[str, Any]) -> nn.Module:
        arch, _ = resolve(name)
        if arch != "dit":
            raise PixformerError(f"--task diffusion trains a DiT (dit-s/2, dit-l/1, ...); {name} is a {arch} model")
        if self.cfg.process == "flow" and model_args.get("learn_sigma"):
            raise PixformerError("--learn-sigma learns the gaussian process's variance; the flow process has none")
        size, chans = self.model_space()
        return create_model(name, img_size=size, in_chans=chans,
                            num_classes=len(self.facts.classes) if self.cfg.conditional else 0, **model_args)

    def model_space(self) -> tuple[tuple[int, int], int]:
        return (tuple(self.latent.grid), self.latent.chans) if self.latent else super().model_space()

    def prepare(self, data: ImageSet) -> ImageSet:
        """Pixel space: the split as it is. Latent space: the split encoded once (cached on disk)."""
        return data if self.latent is None else ImageSet(self.latent.encode_cached(data.images), data.labels, data.classes)

    def inputs(self, images: Tensor) -> Tensor:
        return images.float() if self.latent is not None else super().inputs(images)

    def to_model_space(self, x: Tensor) -> Tensor:
        """Channel-normalised images (as the engine gives them) -> the -1..1 scale diffusion works on;
        latents as they are."""
        if self.latent is not None:
            return x.float()
        mean = torch.tensor(self.facts.mean, device=x.device)[:, None, None]
        std = torch.tensor(self.facts.std, device=x.device)[:, None, None]
        return (x.float() * std + mean) * 2 - 1

    def to_images(self, x: Tensor) -> Tensor:
        """Samples (on -1..1, or latents) -> 0..1 images."""
        if self.latent is not None:
            x = self.latent.decode(x)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def scheduler(self, kind: str, learn_sigma: bool = False, clip: bool = False):
        """A diffusers scheduler with this run's betas: 'ddpm' (also q(x_t | x_0)), 'ddim', 'dpm-solver';
        `clip`: predicted x_0 clipped to -1..1 at each step."""
        d = _diffusers()
        common = dict(num_train_timesteps=self.cfg.timesteps, beta_schedule=SCHEDULES[self.cfg.schedule],
                      beta_start=1e-4, beta_end=0.02)
        # timesteps from T-1 down to 0, as DiT respaces. DDIM steps a fixed stride T / steps, so its
        # timesteps must lie on that stride ("trailing": T-1, T-1-stride, ...); the others take any list
        common["timestep_spacing"] = "trailing" if kind == "ddim" else "linspace"
        if kind == "ddpm":
            return d.DDPMScheduler(**common, clip_sample=clip,
                                   variance_type="learned_range" if learn_sigma else "fixed_small")
        if kind == "ddim":
            return d.DDIMScheduler(**common, clip_sample=clip)
        # clip: its "dynamic" thresholding with a maximum of 1 is a plain clip of x_0 to -1..1
        return d.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                             thresholding=clip, sample_max_value=1.0,
                                             lower_order_final=True)

    def draw(self, x0: Tensor, labels: Tensor, rng: np.random.Generator, drop: bool):
        """Times, noise and (possibly dropped) labels for a batch, from the step's random numbers: gaussian
        integer timesteps uniform in 0..T-1; flow t in (0, 1) logit-normal or uniform, the noise scaled."""
        B, c = x0.shape[0], self.cfg
        if c.process == "flow":
            u = rng.standard_normal(B) if c.t_sampling == "logit-normal" else rng.random(B)
            t = 1 / (1 + np.exp(-(c.t_mean + c.t_std * u))) if c.t_sampling == "logit-normal" else u
            t = torch.from_numpy(t).float().to(x0.device)
        else:
            t = torch.from_numpy(rng.integers(0, c.timesteps, B)).to(x0.device)
        noise = torch.from_numpy(rng.standard_normal(tuple(x0.shape), dtype=np.float32)).to(x0.device)
        if c.process == "flow" and c.noise_scale != 1:
            noise = noise * c.noise_scale
        y = None
        if self.cfg.conditional:
            y = labels.clone()
            if drop and self.cfg.class_dropout > 0:
                y[torch.from_numpy(rng.random(B) < self.cfg.class_dropout).to(x0.device)] = len(self.facts.classes)
        return t, noise, y

    # ---- losses ----------------------------------------------------------------------------
    def at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table `name` at timesteps t (B,), shaped to broadcast against `like` (B, ...), in its dtype."""
        return self.tables[name].to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """z_t (B, C, H, W): gaussian sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (diffusers' add_noise), flow
        t x0 + (1 - t) eps (t = 0: the noise, t = 1: the image)."""
        if self.cfg.process == "flow":
            t = t.reshape(-1, *([1] * (x0.ndim - 1)))
            return t * x0 + (1 - t) * noise
        return self.noise.add_noise(x0, noise, t)

    def model_time(self, t: Tensor) -> Tensor:
        """The time the DiT is conditioned on: the gaussian timestep, or FLOW_TIME * t."""
        return FLOW_TIME * t if self.cfg.process == "flow" else t

    def convert(self, kind: str, out: Tensor, z: Tensor, t: Tensor) -> dict[str, Tensor]:
        """A prediction of `kind` (B, C, H, W) at z_t, times t (B,) -> eps, v and x, by this run's process
        (gaussian_convert, flow_convert): the one conversion the loss and every sampler use."""
        if self.cfg.process == "flow":
            return flow_convert(kind, out, z, t.to(z.dtype).reshape(-1, *([1] * (z.ndim - 1))), self.cfg.t_clamp)
        abar = self.at("abar", t, z)
        return gaussian_convert(kind, out, z, abar.sqrt(), (1 - abar).sqrt())

    def truth(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The true value of what the network predicts (--prediction) for z_t = noisy(x0, noise, t)."""
        kind = self.cfg.prediction
        if kind != "v":
            return noise if kind == "eps" else x0
        if self.cfg.process == "flow":
            return x0 - noise
        abar = self.at("abar", t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def terms(self, model: nn.Module, images: Tensor, labels: Tensor, rng: np.random.Generator, drop: bool):
        x0 = self.to_model_space(images)                                  # (B, C, H, W) on -1..1
        t, noise, y = self.draw(x0, labels, rng, drop)
        xt = self.noisy(x0, noise, t)                                     # (B, C, H, W)
        out = model(xt, self.model_time(t), y).float()                    # (B, C or 2C, H, W)
        C, kind, space = x0.shape[1], self.cfg.prediction, self.cfg.loss_space
        # the output and the truth, both converted to the loss space (JiT: x predicted, v compared)
        pred = self.convert(kind, out[:, :C], xt.float(), t)[space]      # (B, C, H, W)
        target = self.convert(kind, self.truth(x0, noise, t), xt.float(), t)[space]
        mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))                  # (B,)
        terms = {"mse": mse}
        if out.shape[1] == 2 * C:
            eps = self.convert(kind, out[:, :C].detach(), xt.float(), t)["eps"]
            terms["vlb"] = self.vlb(x0, xt.float(), t, eps, out[:, C:])
        return terms

    def vlb(self, x0: Tensor, xt: Tensor, t: Tensor, eps: Tensor, v: Tensor) -> Tensor:
        """(B,) the variational bound term of each image, in bits per dimension: KL(q(x_{t-1} | x_t, x_0)
        || p(x_{t-1} | x_t)) for t > 0 and the discretised decoder NLL at t = 0, with the model's mean
        from `eps` (gradient stopped) and its log-variance interpolated by v in -1..1 between the
        posterior's and beta_t's (improved DDPM, as DiT trains its learned variance)."""
        true_mean = self.posterior_mean(x0, xt, t)
        true_logvar = self.at("post_logvar", t, x0)
        model_mean = self.posterior_mean(self.convert("eps", eps, xt, t)["x"], xt, t)
        frac = (v + 1) / 2
        model_logvar = frac * self.at("betas", t, x0).log() + (1 - frac) * true_logvar
        kl = 0.5 * (-1 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
        per_image = lambda z: z.mean(dim=(1, 2, 3)) / math.log(2.0)       # noqa: E731
        return torch.where(t == 0, per_image(nll), per_image(kl))

    def posterior_mean(self, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """The mean c0 x0 + ct xt of the gaussian posterior q(x_{t-1} | x_t, x_0) (B, C, H, W)."""
        return self.at("c0", t, x0) * x0 + self.at("ct", t, x0) * xt

    def loss(self, model, images, labels, rng):
        terms = self.terms(model, images, labels, rng, drop=True)
        loss = sum(v.mean() for v in terms.values())
        n = len(images)
        return loss, {"n": n, "loss": loss.item() * n, **({"vlb": terms["vlb"].sum().item()} if "vlb" in terms else {})}

    def eval_sums(self, model, images, labels, rng):
        terms = self.terms(model, images, labels, rng, drop=False)
        out = {"n": len(images), "loss": sum(terms.values()).sum().item(), "mse": terms["mse"].sum().item()}
        if "vlb" in terms:
            out["vlb"] = terms["vlb"].sum().item()
        return out

    # ---- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, labels: Tensor | None = None, cfg_scale: float = 1.0,
               sampler: str | None = None, steps: int | None = None, eta: float = 0.0, seed: int = 0,
               img_size: tuple[int, int] | None = None, noise: Tensor | None = None,
               cfg_interval: tuple[float, float] | None = None) -> Tensor:
        """`n` images (n, C, H, W) on -1..1 from `model` (conditioned on `labels` (n,) where the model
        is conditional), with classifier-free guidance `cfg_scale` on every channel of the prediction,
        at the times t in `cfg_interval` (default: the run's; None: every t). The start noise is drawn
        from `seed` (or given as `noise`, of unit variance: the flow scales it by --noise-scale)."""
        sampler, steps, interval = self.sampling(sampler, steps, cfg_interval, eta)
        clip = self.cfg.clip_denoised and self.latent is None            # latents are not bounded to -1..1
        c = model.cfg
        labels = self.check_labels(model, n, labels, cfg_scale)
        device = next(model.parameters()).device
        H, W = img_size or c.img_size
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c.in_chans, H, W, generator=g) if noise is None else noise.float().cpu()
        x = x.to(device)
        if self.cfg.process == "flow":
            return self.sample_flow(model, x, labels, cfg_scale, sampler, steps, interval)
        learn_sigma = c.learn_sigma and sampler == "ddpm"
        # diffusers' DDIM clips x_0 but keeps the unclipped noise for the direction to x_t, which
        # throws samples off; DDIM here clips as DiT (ADM) does: the noise recomputed from the clipped x_0
        clip_eps = clip and sampler == "ddim"
        sched = self.scheduler(sampler, learn_sigma, clip and not clip_eps)
        sched.set_timesteps(steps)
        x = x * sched.init_noise_sigma
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        for t in sched.timesteps:
            tn = t.to(device).expand(n)                                   # (n,)
            scale = cfg_scale if in_interval(1 - int(t) / (self.cfg.timesteps - 1), interval) else 1.0
            out = guided_output(model, x, tn, labels, scale)              # (n, C or 2C, H, W)
            out = out if learn_sigma else out[:, :c.in_chans]
            if self.cfg.prediction != "eps":                              # the schedulers step with the noise
                eps = self.convert(self.cfg.prediction, out[:, :c.in_chans].float(), x.float(), tn)["eps"]
                out = torch.cat([eps, out[:, c.in_chans:]], dim=1)
            if clip_eps:
                out = self.clipped_eps(x, out, int(t))
            x = sched.step(out.float(), t, x, generator=g, **kwargs).prev_sample
        return x

    def sample_flow(self, model: nn.Module, x: Tensor, labels: Tensor | None, cfg_scale: float, sampler: str,
                    steps: int, interval) -> Tensor:
        """The flow's ODE dz/dt = v from t = 0 (noise x (n, C, H, W), scaled by --noise-scale) to t = 1 by
        diffusers' flow-matching Euler or Heun (2nd order; Euler on the last step) schedulers on JiT's
        grid t = 0, 1/steps, ..., 1. Their time is sigma = 1 - t (1 noise .. 0 image) and their model
        output dz/dsigma = -v; built with num_train_timesteps = steps, their grid (sigma from 1 to its
        minimum 1/steps, then 0) is that uniform one, and their timesteps are steps * sigma."""
        d, n = _diffusers(), x.shape[0]
        kind = d.FlowMatchEulerDiscreteScheduler if sampler == "euler" else d.FlowMatchHeunDiscreteScheduler
        sched = kind(num_train_timesteps=steps)
        sched.set_timesteps(steps)
        x = x * self.cfg.noise_scale
        for s in sched.timesteps:                                         # steps * sigma
            t = 1 - float(s) / steps                                      # our t
            scale = cfg_scale if in_interval(t, interval) else 1.0
            tn = torch.full((n,), t, device=x.device)                     # (n,)
            out = guided_output(model, x, FLOW_TIME * tn, labels, scale)  # (n, C, H, W)
            v = self.convert(self.cfg.prediction, out.float(), x.float(), tn)["v"]
            x = sched.step(-v, s, x).prev_sample
        return x

    def sampling(self, sampler: str | None, steps: int | None, interval, eta: float = 0.0) -> tuple[str, int, Any]:
        """The sampler, steps and guidance interval of a sampling call (each defaults to the run's),
        checked against this run's process, and DDIM's eta: one line each, before any work."""
        sampler, steps = sampler or self.cfg.sampler, steps or self.cfg.sample_steps
        interval = self.cfg.cfg_interval if interval is None else tuple(interval)
        check_sampler(sampler, steps, self.cfg.timesteps, self.cfg.process)
        check_interval(interval)
        if eta and sampler != "ddim":
            raise PixformerError(f"--eta is DDIM's noise level; the {sampler} sampler takes none (use --sampler ddim)")
        if not 0 <= eta <= 1:
            raise PixformerError(f"--eta must be between 0 (deterministic DDIM) and 1 (as much noise as DDPM), got {eta}")
        return sampler, steps, interval

    def clipped_eps(self, x: Tensor, eps: Tensor, t: int) -> Tensor:
        """The noise that makes x_t's predicted x_0 the clipped one: eps' = (x_t - sqrt(abar) clip(x_0)) / sqrt(1 - abar)."""
        a = self.noise.alphas_cumprod[t].to(x.device)                   # the scheduler's own (float32) abar, which
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)      # steps with eps': not the float64 tables
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    @torch.no_grad()
    def ddim_invert(self, model: nn.Module, x0: Tensor, labels: Tensor | None = None, steps: int = 50,
                    cfg_scale: float = 1.0) -> Tensor:
        """The deterministic DDIM (eta = 0) path run backwards over the timesteps DDIM samples with:
        images (n, C, H, W) on -1..1 -> the x_T that DDIM with `steps` steps maps back to them
        (approximately: each step uses the noise predicted at the point it starts from). Written here
        so that it visits exactly the timesteps this run's DDIM sampler uses ("trailing" spacing), in
        reverse."""
        if self.cfg.process != "gaussian":
            raise PixformerError("DDIM inversion runs the gaussian process backwards; this run is a flow")
        labels = self.check_labels(model, x0.shape[0], labels, cfg_scale)
        sched = self.scheduler("ddim")                                    # (no clipping: inverts the unclipped path)
        sched.set_timesteps(steps)
        abar = self.noise.alphas_cumprod.to(x0.device)                 # DDIM's (float32), as the sampler it inverts
        x, a_from = x0.float(), torch.tensor(1.0, device=x0.device)
        for t in sched.timesteps.flip(0):                                  # the sampler's timesteps, smallest first
            tn = t.to(x.device).expand(x.shape[0])
            eps = guided_output(model, x, tn, labels, cfg_scale)[:, :x.shape[1]]
            eps = self.convert(self.cfg.prediction, eps.float(), x, tn)["eps"]
            x0_pred = (x - (1 - a_from).sqrt() * eps.float()) / a_from.sqrt()
            a_from = abar[t]
            x = a_from.sqrt() * x0_pred + (1 - a_from).sqrt() * eps.float()
        return x

    def check_labels(self, model: nn.Module, n: int, labels: Tensor | None, cfg_scale: float) -> Tensor | None:
        K = model.cfg.num_classes
        if K == 0:
            if cfg_scale != 1.0:
                raise PixformerError("--cfg-scale needs a class-conditional model; this one is unconditional")
            if labels is not None:
                raise PixformerError("this model is unconditional: it takes no classes")
            return None
        device = next(model.parameters()).device
        labels = torch.arange(n) % K if labels is None else torch.as_tensor(labels).long()
        if labels.shape != (n,):
            raise PixformerError(f"expected {n} class indices, got {tuple(labels.shape)}")
        bad = labels[(labels < 0) | (labels >= K)]
        if len(bad):
            raise PixformerError(f"class index {int(bad[0])} is out of range: this model has classes 0..{K - 1}")
        return labels.to(device)

    @torch.no_grad()
    def report(self, model: nn.Module, data: ImageSet, run_dir: Path | None, epoch: int) -> Path | None:
        """A grid of `samples` images from a fixed seed (classes 0, 1, 2, ... in turn: one column per
        class, named above it), so a run shows the same noise turning into images epoch by epoch; none
        with samples = 0."""
        n = self.cfg.samples
        if n == 0:
            return None
        model.eval()
        scale = self.cfg.cfg_scale if self.cfg.conditional else 1.0
        images = self.to_images(self.sample(model, n, cfg_scale=scale, seed=0)).cpu()
        if run_dir is None:
            return None
        K = len(self.facts.classes) if self.cfg.conditional else 0
        ncol = grid_columns(n, K)
        rows = [images[i:i + ncol] for i in range(0, n, ncol)]
        captions = grid_captions([self.facts.classes[j % K] for j in range(n)], ncol) if K else None
        path = run_dir / "samples" / f"epoch{epoch:03d}.png"
        what = f"{self.cfg.sampler} {self.cfg.sample_steps} steps" + (f", guidance {scale}" if scale != 1 else "")
        if scale != 1 and self.cfg.cfg_interval is not None:
            what += " for t in [{}, {}]".format(*self.cfg.cfg_interval)
        image_grid(rows, [""] * len(rows), path, f"samples, epoch {epoch} ({what})", captions)
        return path


def guided_output(model: nn.Module, x: Tensor, t: Tensor, labels: Tensor | None, scale: float) -> Tensor:
    """The model's output with classifier-free guidance: the prediction (the first C channels: eps, v or
    x, alike, as each is affine in the others at a given z_t, t) becomes uncond + scale * (cond - uncond),
    on every channel; a learned variance is the conditional one. Scale 1 (or no labels) is the plain
    conditional output, in one forward pass."""
    if labels is None or scale == 1.0:
        return model(x, t, labels)
    null = torch.full_like(labels, model.cfg.num_classes)                 # the null class
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))   # (2n, C or 2C, H, W)
    cond, uncond = out.chunk(2)
    C = x.shape[1]
    eps = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])
    return torch.cat([eps, cond[:, C:]], dim=1)


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of images x on -1..1 (256 levels) under a Gaussian discretised to their bins,
    the outer bins open-ended (the decoder term of DDPM's bound)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp_min(1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp_min(1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp_min(1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class LatentSpace:
    """A diffusers AutoencoderKL loaded from a local folder: encodes uint8 image splits to scaled latent
    means (cached on disk, keyed by the VAE's files and the images), decodes latents to -1..1 images."""

    def __init__(self, folder: str, facts):
        d = _diffusers()
        path = Path(folder)
        config = path / "config.json"
        try:
            kind = json.loads(config.read_text()).get("_class_name")
        except (OSError, ValueError):
            kind = None
        if kind != "AutoencoderKL":
            raise PixformerError(f"--latent-vae {folder}: no diffusers AutoencoderKL there (expected config.json with "
                                 f"_class_name AutoencoderKL and its weights, as save_pretrained writes them)")
        try:
            self.vae = d.AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)
        except Exception as e:  # noqa: BLE001 - diffusers raises several kinds for missing or bad weights
            raise PixformerError(f"--latent-vae {folder}: could not load the AutoencoderKL ({str(e).splitlines()[0]})") from None
        c = self.vae.config
        if c.in_channels != facts.in_chans:
            raise PixformerError(f"--latent-vae {folder} encodes {c.in_channels}-channel images; the data has {facts.in_chans}")
        self.factor = 2 ** (len(c.block_out_channels) - 1)
        H, W = facts.img_size
        if H % self.factor or W % self.factor:
            raise PixformerError(f"image size {H}x{W} is not divisible by the VAE's downsampling factor {self.factor}")
        self.grid, self.chans, self.scale = (H // self.factor, W // self.factor), c.latent_channels, c.scaling_factor
        files = sorted(p for p in path.iterdir() if p.is_file())
        self.key = hashlib.sha256(b"".join(p.name.encode() + str(p.stat().st_size).encode() + p.read_bytes()[:1 << 20]
                                           for p in files)).hexdigest()[:16]

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """uint8 (N, C, H, W) -> scaled latent means (N, c, H/f, W/f), float32."""
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].float() / 127.5 - 1
            out.append(self.vae.encode(x).latent_dist.mean * self.scale)
        return torch.cat(out)

    def encode_cached(self, images) -> Tensor:
        """The latents of uint8 images (a tensor or a mapped store), encoded once per machine and mapped
        from the cache: keyed by the VAE's files and a digest of the images' bytes; one process encodes
        (under torchrun the others wait on the entry's lock), every process maps the same file."""
        from ..data.cache import build_once
        h = hashlib.sha256(str(tuple(images.shape)).encode())
        for i in range(0, len(images), 4096):                       # a chunk at a time: never a copy of the set
            h.update(np.ascontiguousarray(images[i:i + 4096].numpy()).tobytes())
        entry = build_once(cache_dir() / "latents" / f"{self.key}-{h.hexdigest()[:16]}",
                           lambda tmp: {"latents": self.encode(images).numpy()}, what="the latents of a split")
        return entry.tensor("latents")

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (N, c, h, w) -> images (N, C, h*f, w*f) on about -1..1."""
        vae = self.vae.to(latents.device)
        return vae.decode(latents.float() / self.scale).sample
