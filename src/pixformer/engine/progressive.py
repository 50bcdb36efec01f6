"""Progressive resizing (FFCV's): the training images start small and grow to --img-size over the
run. `--progressive [16, 24, 32]` spreads the sides evenly over the epochs, epoch e of E (0-based)
training at side sides[e * n // E] of n; the last side is --img-size, the size the data is stored at,
evaluation runs at and checkpoints record. Each training batch is scaled down from the stored uint8
images (antialiased bilinear), before the crop and flip. The side is a function of the step, so a
resumed run resizes as an uninterrupted one. The models take the smaller side as they are: a ViT's or
PiT's learned position table is sampled at the smaller grid's coordinates (pos_embed.sample_table,
what --init's resampling uses), DiT's and MAE's decoder's sincos positions are computed for any grid,
and ConvMixer runs at any size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..data.augment import resize
from ..errors import PixformerError
from ..models.registry import setting
from ..tasks import get_task, task_config

if TYPE_CHECKING:
    from .config import TrainConfig


def side_at(sides: list[int] | None, epoch: int, epochs: int) -> int | None:
    """The training image side of epoch `epoch` (0-based) of `epochs`; None without --progressive."""
    return None if not sides else sides[epoch * len(sides) // epochs]


def resized(images: Tensor, side: int | None) -> Tensor:
    """uint8 images (B, C, H, W) scaled to side x side (antialiased bilinear); as they are when `side` is
    None or already theirs."""
    return images if side is None else resize(images, (side, side))


def check_progressive(cfg: "TrainConfig") -> None:
    """A clear error, before any data is loaded, for a --progressive run that cannot train: images of
    many sizes, pixel permutations, latent diffusion, a side the model's patch does not divide, or a
    smallest side whose tokens the task cannot train on (Task.check_tokens: MAE's visible tokens)."""
    if not cfg.progressive:
        return
    task_cls, task_cfg = get_task(cfg.task), task_config(cfg.task, cfg.task_args)
    why = ("images keep their own sizes at native resolution (--resolution-range varies them)" if cfg.native else
           "a pixel permutation is fixed for --img-size" if cfg.permute_pixels or cfg.local_swaps else
           task_cls.encoded(task_cfg))
    if why:
        raise PixformerError(f"--progressive resizes the training images, but {why}")
    patch = setting(cfg.model, cfg.model_args, "patch_size")
    bad = [s for s in cfg.progressive if s % patch]
    if bad:
        raise PixformerError(f"--progressive: side(s) {bad} are not multiples of {cfg.model}'s patch size {patch}")
    side = min(cfg.progressive)
    try:
        task_cls.check_tokens((side // patch) ** 2, task_cfg)
    except PixformerError as e:
        raise PixformerError(f"--progressive: at side {side}, {e}") from None
