"""Sequence parallelism for long pixel sequences: the Ultra-Long Sequence Distributed Transformer
(LSS, arXiv 2311.02382), applied from outside the model.

The P ranks of a sequence group hold the same images. Each rank holds a shard of every image's
tokens (the class token lives on rank 0): it embeds only those (the position embedding is a function
of each token's coordinates, so a shard needs no neighbours), and runs the norms and MLPs on them
alone. In attention its queries attend over the keys and values all-gathered from the P ranks
(`AttnSpec.group`; the backward reduce-scatters their gradients). Pooling is a sum over the shards
(an all-reduce), so every rank ends with the same logits and the same loss.

    model = SequenceParallel(vit, group, sharding="strided")
    logits = model(images)          # (B, classes) on every rank of the group; weights stay vit's

Gradients (LSS's double averaging). The all-reduce of pooling sums its gradients in backward, so
every rank's gradients are P times its shard's share of the sequence's gradient; the head, which
every rank runs on the same pooled vector, gets the whole gradient on each. Averaging over the P
shards of a sequence therefore gives each parameter exactly the one-process gradient: the blocks',
and the position table's and class token's, whose rows a rank touches only in part. Averaging
then over the D data-parallel copies gives the gradient of the global batch. Both averages are one
all-reduce (mean) over the P x D ranks: `average_gradients`.

Shards: "contiguous" runs of tokens in row-major order, "strided" (every P-th token), or "random" (a
seeded set: PiT treats an image as a set of pixels). Shards are padded to one length; the padding
keys are masked out of attention and the padding queries out of pooling.

Memory: an attention layer keeps the keys and values gathered from all P shards for its backward
(2*T*D values a layer, whatever P), or keeps only the rank's own and gathers again in the backward
(one more all-gather and attention forward). `regather` is how many layers do the latter, the first
ones: the backward starts at the last layer, at the step's peak of memory, where a layer that kept
its keys needs no second copy of them (engine/plan.py counts both; train's --seq-regather auto lets
the planner choose how many). A checkpointed block, selective or full, keeps none either way: its
recomputed forward gathers them again (selective checkpointing keeps matmul outputs, not the gather's).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PixformerError
from ..layout import grid_coords
from ..models import blocks_of
from ..models.attention import AttnSpec
from ..models.vit import VisionTransformer
from .plan import regather_count

SHARDINGS = ("contiguous", "strided", "random")


def all_reduce(t: Tensor, group) -> Tensor:
    """The sum of `t` over `group`, whose backward sums the gradient over it likewise: torch's functional
    collective where it has that backward (torch >= 2.11), else torch.distributed.nn's (deprecated
    there, with a warning each call)."""
    import torch.distributed._functional_collectives as funcol
    if hasattr(funcol, "all_reduce_backward"):
        return funcol.all_reduce(t, "sum", group)
    from torch.distributed.nn.functional import all_reduce as all_reduce_with_backward
    return all_reduce_with_backward(t, group=group)


def check_sharding(sharding: str) -> str:
    """`sharding`, or a clear error naming the shard assignments there are."""
    if sharding not in SHARDINGS:
        raise PixformerError(f"--seq-sharding must be one of {list(SHARDINGS)}, got {sharding!r}")
    return sharding


def shard_tokens(n_tokens: int, parts: int, sharding: str = "contiguous", cls: bool = False,
                 seed: int = 0) -> list[Tensor]:
    """The tokens each of `parts` ranks holds, as indices into the sequence [class token] + n_tokens
    image tokens (the class token, if any, is index 0 and goes to rank 0)."""
    check_sharding(sharding)
    if n_tokens < parts:
        raise PixformerError(f"an image of {n_tokens} tokens cannot be split over {parts} sequence-parallel ranks; "
                             f"use --seq-parallel at most {n_tokens} or larger images")
    image = torch.arange(int(cls), int(cls) + n_tokens)
    if sharding == "contiguous":
        shards = list(image.tensor_split(parts))
    elif sharding == "strided":
        shards = [image[r::parts] for r in range(parts)]
    else:
        order = image[torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))]
        shards = [s.sort().values for s in order.tensor_split(parts)]
    if cls:
        shards[0] = torch.cat([torch.zeros(1, dtype=torch.long), shards[0]])
    return shards


@lru_cache(maxsize=8)
def _layout(grid: tuple[int, int], parts: int, sharding: str, cls: bool, seed: int):
    """Per rank: (image-token indices, whether it holds the class token), the padded shard length and
    the key mask over the gathered shards ((1, 1, 1, P*S) bool, None when no shard is padded)."""
    shards = shard_tokens(grid[0] * grid[1], parts, sharding, cls, seed)
    length = max(len(s) for s in shards)
    valid = torch.zeros(parts, length, dtype=torch.bool)
    for r, s in enumerate(shards):
        valid[r, :len(s)] = True
    mine = [(s[s >= int(cls)] - int(cls), cls and r == 0) for r, s in enumerate(shards)]
    return mine, length, None if bool(valid.all()) else valid.reshape(1, 1, 1, -1)


class SequenceParallel(nn.Module):
    """A ViT classifier whose every image is split over the ranks of `group` (see the module doc).
    Its parameters are the wrapped model's."""

    def __init__(self, model: VisionTransformer, group, sharding: str = "contiguous", seed: int = 0,
                 regather: int | bool = 0):
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise PixformerError(f"sequence parallelism splits a ViT's tokens; got a {type(model).__name__}")
        if group is None or not dist.is_initialized():
            raise PixformerError("SequenceParallel needs the process group its ranks split each image over (under "
                                 "torchrun; e.g. torch.distributed.group.WORLD)")
        self.module, self.group, self.sharding = model, group, check_sharding(sharding)
        depth = self.depth = len(blocks_of(model))
        self.seed, self.regather = seed, depth if regather is True else regather_count(int(regather), depth)
        self.rank, self.parts = dist.get_rank(group), dist.get_world_size(group)

    def forward(self, images: Tensor) -> Tensor:
        vit = self.module
        patches, grid = vit.patchify(images)                                  # (B, N, p*p*C)
        shards, length, key_mask = _layout(grid, self.parts, self.sharding, vit.cls_token is not None, self.seed)
        idx, has_cls = shards[self.rank]
        idx = idx.to(patches.device)
        coords = grid_coords(*grid, device=patches.device)[idx]               # (n, 2) this rank's tokens
        x = vit.embed_tokens(patches[:, idx], grid, coords)                   # (B, n, D)
        x = vit.prepend_cls(x) if has_cls else x                              # (B, n', D), class token on rank 0
        held = x.shape[1]
        x = F.pad(x, (0, 0, 0, length - held))                                # (B, S, D) padded to the shard length
        mask = None if key_mask is None else key_mask.to(x.device)
        keep = AttnSpec(mask=mask, group=self.group)
        again = AttnSpec(mask=mask, group=self.group, regather=True, cache=keep.cache)
        specs = [again] * self.regather + [keep] * (self.depth - self.regather)  # the first layers regather
        feats = vit.encode(x, specs)                                          # (B, S, D) queries over gathered keys
        if vit.cls_token is not None:                                         # rank 0's first token
            mine = feats[:, 0] * float(has_cls)   # (B, D), zeros off rank 0 (in the graph: every rank's
            #                                       backward then joins the all-reduce's)
            pooled = all_reduce(mine, group=self.group)                       # (B, D), summed over the shards
        else:
            n = grid[0] * grid[1]
            pooled = all_reduce(feats[:, :held].sum(1) / n, group=self.group)  # (B, D), mean of all tokens
            pooled = vit.fc_norm(pooled)
        return vit.head(pooled)                                               # (B, classes), same on every rank


def average_gradients(model: nn.Module, group=None) -> None:
    """LSS's double gradient averaging, over the shards of each sequence and then the data-parallel
    copies, as one all-reduce (mean) of every gradient over `group` (default: the world). A parameter
    a rank did not touch (the class token off rank 0) counts as a zero gradient there."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)
