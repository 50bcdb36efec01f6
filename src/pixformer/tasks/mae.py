"""MAE pretraining: hide most tokens of each image, reconstruct them (models/mae.py computes).

The task owns the masking (per image, from the step's seeded random numbers, so a resumed run hides
the same tokens), the reconstruction target and its normalisation, and the loss: the mean squared
error over the hidden tokens only. Target normalisations (`target`):
    patch   MAE's norm-pix: each target patch standardised by its own mean and variance (over its
            p*p*C values). At p = 1 a "patch" is one pixel's C values, and this removes most of it.
    none    the (channel-normalised) pixels as they are
    local   each pixel standardised by the mean and variance of its k x k neighbourhood (all
            channels; `local_kernel`), which keeps meaning at any patch size, p = 1 included
    auto    patch for p > 1, none at p = 1 (scripts/mae_targets.py: on digits, a linear probe of
            PiT features scored 70.8 % after `none` and 69.1 % after `local`, two seeds each)
Evaluation reports the error in pixel space (the prediction mapped back through the target's
normalisation and the channel normalisation, on the 0..1 scale) as `loss`, so runs with different
targets compare, and the training objective as `target_loss`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import normalize
from ..data.store import ImageSet
from ..errors import PixformerError
from ..models.mae import DECODER_SIZES, MAEConfig, MaskedAutoencoder, random_keep, visible_count
from ..models.registry import VIT_SIZES
from ..layout import check_grid, patchify, unpatchify
from ..settings import check_fields, require
from .base import Task
from .figures import image_grid

TARGETS = ("auto", "patch", "none", "local")


@dataclass
class MAETaskConfig:
    mask_ratio: float = 0.75            # fraction of each image's tokens hidden
    target: str = "auto"                # what the decoder predicts: patch (each patch standardised, MAE's
    #                                     norm-pix), none (the pixels), local (each pixel standardised over its
    #                                     --local-kernel neighbourhood), auto (patch for p > 1, none at p = 1)
    local_kernel: int = 3               # neighbourhood side for target=local (odd)
    decoder_depth: int | None = None    # decoder size; unset: by the encoder's size (models/mae.DECODER_SIZES)
    decoder_dim: int | None = None      # decoder width; unset: by the encoder's size
    decoder_heads: int | None = None    # decoder attention heads; unset: by the encoder's size
    samples: int = 8                    # validation images in each epoch's reconstructions PNG

    def __post_init__(self):
        check_fields(self)                                          # types; every float finite
        for name, least in (("decoder_depth", 0), ("decoder_dim", 1), ("decoder_heads", 1)):
            value = getattr(self, name)
            require(name, value, value is None or value >= least, f"at least {least} (or unset)")
        require("samples", self.samples, self.samples >= 0, "at least 0")
        visible_count(10 ** 6, self.mask_ratio)                     # the ratio itself must be in (0, 1)
        if self.target not in TARGETS:
            raise PixformerError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.local_kernel < 1 or self.local_kernel % 2 == 0:
            raise PixformerError(f"local_kernel must be an odd size >= 1, got {self.local_kernel}")


def normalise_target(images: Tensor, p: int, target: str, kernel: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """The reconstruction target of `images` (B, C, H, W) as patches (B, N, p*p*C), with the mean and
    std (each broadcastable to it) that map a prediction back: pixels = target * std + mean."""
    patches, grid = patchify(images, p)                                       # (B, N, p*p*C)
    if target == "none":
        return patches, torch.zeros(()), torch.ones(())
    if target == "patch":
        mean = patches.mean(dim=-1, keepdim=True)                             # (B, N, 1)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (patches - mean) / std, mean, std
    # local: statistics of each pixel's k x k neighbourhood over all channels, then patched like the pixels
    pool = lambda t: F.avg_pool2d(t, kernel, stride=1, padding=kernel // 2, count_include_pad=False)  # noqa: E731
    mean = pool(images.mean(1, keepdim=True)).expand_as(images)               # (B, C, H, W)
    var = (pool((images * images).mean(1, keepdim=True)) - pool(images.mean(1, keepdim=True)) ** 2).clamp_min(0)
    std = (var + 1e-6).sqrt().expand_as(images)
    mean, std = patchify(mean.contiguous(), p)[0], patchify(std.contiguous(), p)[0]
    return (patches - mean) / std, mean, std


class MAE(Task):
    name = "mae"
    Config = MAETaskConfig
    best = ("loss", "min")
    uses_labels = False
    shown_as = {"loss": "pixel loss", "target_loss": "loss"}   # the pixel-space error; the objective as trained
    architectures = ("vit",)
    embeds_subsets = True
    choices = {"target": tuple(TARGETS)}

    def build_model(self, name: str, model_args: dict[str, Any]) -> nn.Module:
        encoder = self.vit_encoder(name, model_args)
        size = re.match(r"(?:vit|pit)-([a-z0-9]+)", name.strip().lower())[1]
        if size not in DECODER_SIZES:           # a run's printed size (pit-d4w64): the listed one nearest in width
            size = min(DECODER_SIZES, key=lambda s: abs(VIT_SIZES[s]["dim"] - encoder["dim"]))
        decoder = {k: v if getattr(self.cfg, k) is None else getattr(self.cfg, k)
                   for k, v in DECODER_SIZES[size].items()}
        rows, cols = check_grid(self.facts.img_size, encoder["patch_size"])
        visible_count(rows * cols, self.cfg.mask_ratio)                      # at least one visible token
        if self.cfg.target == "patch" and encoder["patch_size"] ** 2 * self.facts.in_chans < 2:
            raise PixformerError("target 'patch' standardises each patch by its own variance, but a 1x1 patch of "
                                 "one channel is a single value; use --target none or local")
        return MaskedAutoencoder(MAEConfig(encoder=encoder, **decoder))

    @classmethod
    def check_tokens(cls, tokens: int, cfg: MAETaskConfig) -> None:
        visible_count(tokens, cfg.mask_ratio)                                # at least one visible token

    def block_tokens(self, model: nn.Module) -> list[int]:
        """The encoder's blocks see the visible tokens, the decoder's every position (+ the class token)."""
        enc = model.encoder.cfg
        rows, cols = check_grid(self.facts.img_size, enc.patch_size)
        cls = int(enc.pool == "cls")
        return ([visible_count(rows * cols, self.cfg.mask_ratio) + cls] * enc.depth
                + [rows * cols + cls] * len(model.decoder_blocks))

    def patch_size(self, model: nn.Module) -> int:
        return model.encoder.cfg.patch_size

    def target_kind(self, model: nn.Module) -> str:
        if self.cfg.target == "auto":
            return "none" if self.patch_size(model) == 1 else "patch"
        return self.cfg.target

    def reconstruct(self, model: nn.Module, images: Tensor, rng: np.random.Generator):
        """Mask, predict, and the target: (pred, target, mask, mean, std), all (B, N, ...) in patch layout."""
        p = self.patch_size(model)
        N = (images.shape[-2] // p) * (images.shape[-1] // p)
        noise = torch.from_numpy(rng.random((images.shape[0], N))).to(images.device)
        keep, mask, _ = random_keep(noise, self.cfg.mask_ratio)
        pred = model(images, keep).float()                                    # (B, N, p*p*C)
        target, mean, std = normalise_target(images.float(), p, self.target_kind(model), self.cfg.local_kernel)
        return pred, target, mask, mean.to(images.device), std.to(images.device)

    @staticmethod
    def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the hidden tokens only (mask 1 = hidden), averaged per token first."""
        return (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()

    def loss(self, model, images, labels, rng):
        pred, target, mask, _, _ = self.reconstruct(model, images, rng)
        loss = self.masked_mse(pred, target, mask)
        return loss, {"n": len(images), "loss": loss.item() * len(images)}

    def to_pixels(self, patches: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """Target-space patches -> pixel values on the 0..1 scale, in patch layout (channels last)."""
        C = self.facts.in_chans
        x = patches * std + mean                                              # channel-normalised pixels
        cm = torch.tensor(self.facts.mean, device=x.device).repeat(x.shape[-1] // C)
        cs = torch.tensor(self.facts.std, device=x.device).repeat(x.shape[-1] // C)
        return x * cs + cm

    def eval_sums(self, model, images, labels, rng):
        pred, target, mask, mean, std = self.reconstruct(model, images, rng)
        per_token = ((self.to_pixels(pred, mean, std) - self.to_pixels(target, mean, std)) ** 2).mean(-1)
        hidden = mask.sum(1)                                                  # (B,) the same for every image
        return {"n": len(images), "loss": ((per_token * mask).sum(1) / hidden).sum().item(),
                "target_loss": ((((pred - target) ** 2).mean(-1) * mask).sum(1) / hidden).sum().item()}

    @torch.no_grad()
    def report(self, model: nn.Module, data: ImageSet, run_dir: Path | None, epoch: int) -> Path | None:
        """A PNG of `samples` validation images, one of each class first (spread_over_classes), each
        named: original, the visible tokens (hidden ones grey), and the reconstruction with the visible
        pixels pasted back (masks drawn with seed 0)."""
        model.eval()
        device = next(model.parameters()).device
        shown = spread_over_classes(data.labels, self.cfg.samples)
        x = normalize(data.images[shown].to(device), self.facts.mean, self.facts.std)
        pred, target, mask, mean, std = self.reconstruct(model, x, np.random.default_rng(0))
        p = self.patch_size(model)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        original, recon = self.to_pixels(target, mean, std), self.to_pixels(pred, mean, std)   # 0..1
        hidden = mask[..., None].bool()
        rows = [unpatchify(v.clamp(0, 1), p, grid).cpu() for v in
                (original, torch.where(hidden, 0.5, original), torch.where(hidden, recon, original))]
        if run_dir is None:
            return None
        path = run_dir / "reconstructions" / f"epoch{epoch:03d}.png"
        names = [data.classes[k] for k in data.labels[shown].tolist()]
        image_grid(rows, ["original", f"visible ({100 * (1 - self.cfg.mask_ratio):.0f} %)", "reconstruction"],
                   path, f"MAE, epoch {epoch}: validation images", [names, [""] * len(names), [""] * len(names)])
        return path


def spread_over_classes(labels: Tensor, n: int) -> Tensor:
    """Indices of `n` images (at most all) to show: the first image of each class, in class order, then
    the first of the others in order (a split sorted by class would otherwise show one class only)."""
    labels = torch.as_tensor(labels).long()
    if len(labels) == 0:
        return labels
    order = torch.arange(len(labels))
    first = torch.full((int(labels.max()) + 1,), len(labels)).scatter_reduce(0, labels, order, "amin")
    first = first[first < len(labels)]                                   # each present class's first image
    taken = torch.zeros(len(labels), dtype=torch.bool)
    taken[first] = True
    return torch.cat([first, order[~taken]])[:n]
