"""Images from a trained diffusion run (`pixformer sample`): a PNG grid, every image as a PNG, and
an .npz with the images (uint8, N x H x W x C) and their labels, for FID or a classifier."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.checkpoint import find_checkpoint
from ..errors import PixformerError
from ..tasks import task_of
from ..tasks.diffusion import Diffusion
from ..tasks.figures import save_png, tile, to_uint8


def diffusion_task(state: dict[str, Any], where: str) -> Diffusion:
    """The diffusion task of a run's saved state, or a clear error for a run of another task."""
    task = task_of(state)
    if not isinstance(task, Diffusion):
        raise PixformerError(f"{where} is a {task.name} run; sampling needs a diffusion run (--task diffusion)")
    return task


@torch.no_grad()
def sample_images(task: Diffusion, model: nn.Module, num: int, classes: list[int] | None, cfg_scale: float,
                  sampler: str | None, steps: int | None, eta: float, seed: int,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`num` images (num, C, H, W) on 0..1 and their labels (or None). The start noise of image i does not
    depend on the batch size (all of it is drawn from `seed` first), so neither do the deterministic
    samplers' images (DDIM with eta 0, DPM-Solver++); DDPM's per-step noise is drawn per batch."""
    c = model.cfg
    labels = None
    if classes or c.num_classes:
        labels = torch.tensor(classes if classes else list(range(c.num_classes)))
        labels = labels.repeat(-(-num // len(labels)))[:num]
    task.check_labels(model, num, labels, cfg_scale)                    # bad classes / guidance: before any work
    noise = torch.randn(num, c.in_chans, *c.img_size, generator=torch.Generator().manual_seed(seed))
    out = []
    for i, start in enumerate(range(0, num, batch_size)):
        part = slice(start, start + batch_size)
        x = task.sample(model, len(noise[part]), None if labels is None else labels[part], cfg_scale, sampler,
                        steps, eta, seed=seed * 1_000_003 + i, noise=noise[part])
        out.append(task.to_images(x).cpu())
    return torch.cat(out), labels


def generate(model: nn.Module, state: dict[str, Any], checkpoint: str, out: str | None, num: int,
             classes: list[int] | None, cfg_scale: float, sampler: str | None, steps: int | None, eta: float,
             seed: int, batch_size: int, device: torch.device) -> Path:
    if num < 1:
        raise PixformerError(f"--num must be at least 1, got {num}")
    task = diffusion_task(state, checkpoint)
    run = find_checkpoint(checkpoint)
    folder = Path(out) if out else run.parent / "generated"
    images, labels = sample_images(task, model.to(device), num, classes, cfg_scale, sampler, steps, eta, seed,
                                   batch_size)
    pixels = to_uint8(images)                                          # (N, H, W, C)
    scale = max(1, 128 // max(pixels.shape[1:3]))                       # tiny images drawn larger
    save_png(tile(pixels, nrow=min(num, 8)), folder / "grid.png", scale)
    for i, img in enumerate(pixels):
        save_png(img, folder / "images" / f"{i:05d}.png")
    np.savez(folder / "samples.npz", images=pixels,
             labels=np.full(num, -1) if labels is None else labels.numpy(),
             classes=np.array(task.facts.classes))
    return folder
