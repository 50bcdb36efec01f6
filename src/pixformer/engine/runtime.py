"""Where a run executes: the device, this process's rank among the world's, and the few collectives
the engine needs. One process by default; under torchrun (`torchrun --nproc-per-node N -m pixformer
train ...`) every process joins torch.distributed's default group (gloo on CPU, NCCL on GPUs) and
trains its part of each global batch, gradients averaged by DistributedDataParallel.

    rt = Runtime.create("auto")          # cuda if available, else cpu; joins the group under torchrun
    rt.is_main                           # only the main process writes checkpoints and logs
    rt.part(64)                          # this rank's rows of a global batch of 64
    sums = rt.all_reduce({"n": 10, "correct": 7.0})
    rt.close()                           # a run's last call: a barrier (the group is left at exit)
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import PixformerError


def pick_device(name: str) -> torch.device:
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`, or a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PixformerError(f"device {name!r} asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PixformerError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP whose other attributes are the wrapped model's (a task may read `model.encoder.cfg`)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def create(cls, device: str = "auto") -> "Runtime":
        """The runtime of this process: one process, or a rank of a torchrun launch (WORLD_SIZE > 1)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() \
            else int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(pick_device(device))
        if not dist.is_initialized() and not all(k in os.environ for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR")):
            raise PixformerError(f"WORLD_SIZE={world} without torchrun's RANK / LOCAL_RANK / MASTER_ADDR: launch "
                                 "with `torchrun --nproc-per-node N -m pixformer train ...`")
        dev = pick_device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():  # joined once per process, left at its exit: a second run reuses it
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            atexit.register(_leave_group)
        return cls(dev, dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous rows of a global batch of `n` (the world size must divide it)."""
        if n % self.world_size:
            raise PixformerError(f"the global batch of {n} does not split evenly over {self.world_size} processes; "
                                 f"use a --batch-size divisible by {self.world_size}")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module a training step calls: `model` itself, or across processes DDP around it (its
        gradients averaged over the ranks in backward; weights stay `model`'s, checkpoints plain)."""
        if self.world_size == 1:
            return model
        return _DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_reduce(self, sums: dict[str, float]) -> dict[str, float]:
        """Each value summed over the processes (in float64), by key."""
        if self.world_size == 1:
            return dict(sums)
        t = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(sums, t.tolist()))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, barrier: bool = True) -> None:
        """The end of a run: a barrier, so no rank goes on to leave the group (at exit) while another
        still talks to it (2-process gloo runs otherwise abort at exit); none when this rank ends on an
        error, since the others may be inside a collective."""
        if self.world_size > 1 and dist.is_initialized() and barrier:
            dist.barrier()


def _leave_group() -> None:
    """At exit: leave the process group this process joined (after the last run's barrier)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class RankRandom:
    """A task's training draws for a global batch, this rank's rows kept: a draw whose first dimension
    is the local batch is drawn for the global batch from the shared (seed, step) generator and sliced,
    so N processes see the numbers one process would; other draws (a scalar, a permutation) are
    drawn as they are, the same on every rank."""

    def __init__(self, rng: np.random.Generator, part: slice, global_batch: int):
        self.rng, self.part, self.global_batch = rng, part, global_batch
        self.local = part.stop - part.start

    def _shape(self, shape):
        if shape is None:
            return None, False
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if shape and shape[0] == self.local:
            return (self.global_batch, *shape[1:]), True
        return shape, False

    def random(self, size=None):
        shape, cut = self._shape(size)
        out = self.rng.random(shape)
        return out[self.part] if cut else out

    def standard_normal(self, size=None, dtype=np.float64):
        shape, cut = self._shape(size)
        out = self.rng.standard_normal(shape, dtype=dtype)
        return out[self.part] if cut else out

    def integers(self, low, high=None, size=None):
        shape, cut = self._shape(size)
        out = self.rng.integers(low, high, shape)
        return out[self.part] if cut else out

    def __getattr__(self, name):        # beta, permutation, ...: as drawn
        return getattr(self.rng, name)
