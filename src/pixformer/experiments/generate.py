"""Images from a trained diffusion run (`pixformer sample`): a PNG grid (one column per class, named),
every image as a PNG, and an .npz with the images (uint8, N x H x W x C) and their labels, for FID or
a classifier."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.checkpoint import find_checkpoint
from ..errors import PixformerError
from ..progress import Progress
from ..tasks import task_of
from ..tasks.diffusion import Diffusion
from ..files import output_folder, written
from ..tasks.figures import grid_columns, labelled_tile, save_png, to_uint8


def diffusion_task(state: dict[str, Any], where: str) -> Diffusion:
    """The diffusion task of a run's saved state, or a clear error for a run of another task."""
    task = task_of(state)
    if not isinstance(task, Diffusion):
        raise PixformerError(f"{where} is a {task.name} run; sampling needs a diffusion run (--task diffusion)")
    return task


def sample_labels(task: Diffusion, model: nn.Module, num: int, classes: list[int] | None,
                  cfg_scale: float) -> torch.Tensor | None:
    """The class of each of `num` samples: `classes` (default: 0, 1, 2, ... of a conditional model) over
    and over; None for an unconditional model. Bad classes or guidance are one line, before any work."""
    labels = None
    if classes or model.cfg.num_classes:
        labels = torch.tensor(classes if classes else list(range(model.cfg.num_classes)))
        labels = labels.repeat(-(-num // len(labels)))[:num]
    task.check_labels(model, num, labels, cfg_scale)
    return labels


@torch.no_grad()
def sample_images(task: Diffusion, model: nn.Module, num: int, classes: list[int] | None, cfg_scale: float,
                  sampler: str | None, steps: int | None, eta: float, seed: int,
                  batch_size: int, cfg_interval: tuple[float, float] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`num` images (num, C, H, W) on 0..1 and their labels (or None), guided for t in `cfg_interval`
    (default: the run's). The start noise of image i does not depend on the batch size (all of it is
    drawn from `seed` first), so neither do the deterministic samplers' images (DDIM with eta 0,
    DPM-Solver++, the flow's Euler and Heun); DDPM's per-step noise is drawn per batch."""
    c = model.cfg
    labels = sample_labels(task, model, num, classes, cfg_scale)
    noise = torch.randn(num, c.in_chans, *c.img_size, generator=torch.Generator().manual_seed(seed))
    out = []
    with Progress(num, "sampling") as progress:
        for i, start in enumerate(range(0, num, batch_size)):
            part = slice(start, start + batch_size)
            x = task.sample(model, len(noise[part]), None if labels is None else labels[part], cfg_scale, sampler,
                            steps, eta, seed=seed * 1_000_003 + i, noise=noise[part], cfg_interval=cfg_interval)
            out.append(task.to_images(x).cpu())
            progress.update(len(x))
    return torch.cat(out), labels


# what `generate` writes, and the temporary files of a write a kill interrupted (files.written)
SAMPLE_FILES = re.compile(r"samples\.npz|grid\.png|images|images/\d{5}\.png"
                          r"|(images/)?\.(samples\.npz|grid\.png|\d{5}\.png)\.tmp-\d+-[0-9a-f]+")


def check_sample_out(folder: Path) -> Path:
    """`folder`, if it is new or holds only what an earlier `pixformer sample` wrote (which is replaced);
    else one line naming a file of someone else's, before any sampling."""
    if not folder.is_dir():
        return folder
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        ours = SAMPLE_FILES.fullmatch(name) and (name != "images" or path.is_dir()) and not path.is_symlink()
        if ours and name == "samples.npz":
            try:
                with np.load(path) as saved:
                    ours = {"images", "labels", "classes"} <= set(saved.files)
            except (OSError, ValueError):
                ours = False
        if not ours:
            raise PixformerError(f"--out {folder} holds {path}, which no earlier `pixformer sample` wrote: choose "
                                 "another --out (samples replace only a folder of earlier samples)")
    return folder


def generate(model: nn.Module, state: dict[str, Any], checkpoint: str, out: str | None, num: int,
             classes: list[int] | None, cfg_scale: float, sampler: str | None, steps: int | None, eta: float,
             seed: int, batch_size: int, device: torch.device, cfg_interval: tuple[float, float] | None = None) -> Path:
    """Sample `num` images and write them to `out` (default: RUN/generated): samples.npz, grid.png (one
    column per class, each named above its column) and images/NNNNN.png, replacing an earlier call's
    (its images past `num` removed; a folder holding anything else is refused). Everything that can be
    refused (the classes, the sampler and guidance interval, the folder) is, before any sampling."""
    if num < 1:
        raise PixformerError(f"--num must be at least 1, got {num}")
    task = diffusion_task(state, checkpoint)
    task.sampling(sampler, steps, cfg_interval, eta)
    sample_labels(task, model, num, classes, cfg_scale)
    folder = output_folder(check_sample_out(Path(out) if out else find_checkpoint(checkpoint).parent / "generated"))
    images, labels = sample_images(task, model.to(device), num, classes, cfg_scale, sampler, steps, eta, seed,
                                   batch_size, cfg_interval)
    pixels = to_uint8(images)                                          # (N, H, W, C)
    with written(folder / "samples.npz") as tmp, open(tmp, "wb") as f:  # the samples first: nothing else needs them
        np.savez(f, images=pixels, labels=np.full(num, -1) if labels is None else labels.numpy(),
                 classes=np.array(task.facts.classes))
    scale = max(1, 128 // max(pixels.shape[1:3]))                       # tiny images drawn larger
    ncol = grid_columns(num, len(classes) if classes else model.cfg.num_classes)
    names = None if labels is None else [task.facts.classes[k] for k in labels.tolist()]
    save_png(labelled_tile(pixels, ncol, names, scale), folder / "grid.png")
    for i, img in enumerate(pixels):
        save_png(img, folder / "images" / f"{i:05d}.png")
    for stale in (folder / "images").glob("[0-9][0-9][0-9][0-9][0-9].png"):   # an earlier call's, past this one's
        if int(stale.stem) >= num:
            stale.unlink()
    return folder
