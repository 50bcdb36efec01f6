"""Where a run executes: the device, this process's rank among the world's, and the few collectives
the engine needs (summing evaluation statistics, a barrier). Trivial in one process; a multi-process
launch plugs in here without touching the tasks.

    rt = Runtime.create("auto")          # cuda if available, else cpu
    rt.is_main                           # only the main process writes checkpoints and logs
    sums = rt.all_reduce({"n": 10, "correct": 7.0})
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def create(cls, device: str = "auto") -> "Runtime":
        """The runtime of this process. Training across processes (torchrun) is not supported yet:
        a multi-process launch is refused here rather than trained as unsynchronised copies."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() \
            else int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise PixformerError(f"launched as {world} processes (WORLD_SIZE={world}); pixformer trains in one "
                                 "process for now: run it without torchrun")
        return cls(pick_device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
