"""Where a run executes: the device, this process's rank among the world's, and the few collectives
the engine needs. One process by default; under torchrun (`torchrun --nproc-per-node N -m pixformer
train ...`) every process joins torch.distributed's default group (gloo on CPU, NCCL on GPUs) and
trains its part of each global batch:
- data parallel (default): gradients averaged by DistributedDataParallel;
- `fsdp`: FSDP2 (`fully_shard` per block and at the root) shards weights, gradients and optimizer
  state over the ranks; only rank 0 builds the whole model (`building`), the others build it on the
  meta device and receive their shards from rank 0 in `wrap`; checkpoints are gathered into plain
  full tensors;
- `seq_parallel` P: consecutive groups of P ranks share their images and split each image's tokens
  (engine/sequence.py, LSS); the world is P x D, D data-parallel groups.

    rt = Runtime.create("auto")          # cuda if available, else cpu; joins the group under torchrun
    rt.is_main                           # only the main process writes checkpoints and logs
    rt.part(64)                          # this rank's rows of a global batch of 64
    step_model = rt.wrap(model)          # DDP, FSDP2 or sequence-parallel around `model`
    rt.sync_gradients(model)             # after backward: what DDP / FSDP2 do not do themselves
    sums = rt.all_reduce({"n": 10, "correct": 7.0})
    rt.close()                           # a run's last call: a barrier (the group is left at exit)
"""
from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import PixformerError
from ..progress import notice


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


def check_combination(seq_parallel: int, fsdp: bool) -> None:
    """One line for parallelisms that cannot run together (checked by train and by the planner)."""
    if seq_parallel > 1 and fsdp:
        raise PixformerError("--fsdp and --seq-parallel cannot be combined yet; choose one")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    seq_parallel: int = 1            # ranks splitting each image's tokens (consecutive ranks form a group)
    seq_sharding: str = "contiguous"
    seq_seed: int = 0                # draws a "random" sharding
    seq_group: Any = None            # this rank's sequence group
    fsdp: bool = False

    @classmethod
    def create(cls, device: str = "auto", seq_parallel: int = 1, seq_sharding: str = "contiguous",
               fsdp: bool = False, seed: int = 0) -> "Runtime":
        """The runtime of this process: one process, or a rank of a torchrun launch (WORLD_SIZE > 1)."""
        from .sequence import check_sharding
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() \
            else int(os.environ.get("WORLD_SIZE", "1"))
        if seq_parallel < 1:
            raise PixformerError(f"--seq-parallel must be at least 1, got {seq_parallel}")
        check_sharding(seq_sharding)
        if world == 1 and (seq_parallel > 1 or fsdp):
            what = f"--seq-parallel {seq_parallel} splits each image over {seq_parallel}" if seq_parallel > 1 \
                else "--fsdp shards the model over several"
            raise PixformerError(f"{what} processes: launch with `pixformer launch --nproc-per-node N train ...` "
                                 "(or torchrun --nproc-per-node N -m pixformer train ...), N at least 2")
        if world % seq_parallel:
            raise PixformerError(f"--seq-parallel {seq_parallel} does not divide the world size {world}")
        check_combination(seq_parallel, fsdp)
        if world == 1:
            return cls(pick_device(device))
        if not dist.is_initialized() and not all(k in os.environ for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR")):
            raise PixformerError(f"WORLD_SIZE={world} without torchrun's RANK / LOCAL_RANK / MASTER_ADDR: launch "
                                 "with `pixformer launch --nproc-per-node N train ...` (or torchrun)")
        dev = pick_device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():  # joined once per process, left at its exit: a second run reuses it
            _join_group("nccl" if dev.type == "cuda" else "gloo")
            atexit.register(_leave_group)
        group = _sequence_group(seq_parallel) if seq_parallel > 1 else None
        return cls(dev, dist.get_rank(), dist.get_world_size(), seq_parallel, seq_sharding, seed, group, fsdp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> int:
        """D: the number of groups that train different rows of each batch."""
        return self.world_size // self.seq_parallel

    @property
    def data_rank(self) -> int:
        return self.rank // self.seq_parallel

    def part(self, n: int) -> slice:
        """This rank's contiguous rows of a global batch of `n` (the ranks of one sequence group hold the
        same rows; the data-parallel size D must divide `n`)."""
        D = self.data_parallel
        if n % D:
            over = f"{D} processes" if self.seq_parallel == 1 else f"{D} data-parallel groups"
            raise PixformerError(f"the global batch of {n} does not split evenly over {over}; "
                                 f"use a --batch-size divisible by {D}")
        k = n // D
        return slice(self.data_rank * k, (self.data_rank + 1) * k)

    def wrap(self, model: nn.Module, train: bool = True, regather: int = 0) -> nn.Module:
        """The module a step calls: `model` itself, or across processes the sequence-parallel view of it
        (its first `regather` layers gathering keys and values again in the backward), FSDP2 (applied to
        `model` in place; build the optimizer after) or, for training, DDP around it. Weights stay
        `model`'s; checkpoints stay plain."""
        if self.seq_parallel > 1:
            from .sequence import SequenceParallel
            return SequenceParallel(model, self.seq_group, self.seq_sharding, self.seq_seed, regather)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            from torch.distributed.fsdp import FSDPModule, fully_shard   # here: 1 s to import, FSDP2 only
            # FSDP2 warns when the root returns a view (a Linear's output over tokens is one: MAE's prediction)
            # lest an in-place op on it skip a hook; a step here only ever reads the output
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            if not any(isinstance(m, FSDPModule) for m in model.modules()):
                from ..models import blocks_of
                full = model.state_dict() if self.rank == 0 else {}
                for block in blocks_of(model):
                    fully_shard(block)                     # one all-gather per block: the memory of one at a time
                fully_shard(model)
                if self.rank != 0:
                    model.to_empty(device=self.device)     # its shards, still to be filled
                set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                           broadcast_from_rank0=True))
            return model
        if self.world_size == 1 or not train:
            return model
        return _DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @property
    def holds_weights(self) -> bool:
        """Whether this rank's model has real weights before `wrap`: under FSDP2 only rank 0 builds the
        whole model; the others build it on the meta device and receive their shards in `wrap`."""
        return not self.fsdp or self.rank == 0

    @property
    def replicas(self) -> Any:
        """The process group over whose ranks the model's parameters are whole, identical copies (DDP,
        sequence parallelism: every rank), so work done to them alike can be shared out (Muon's iteration,
        engine/optim.py); None in one process or under FSDP2, whose ranks hold shards."""
        return dist.group.WORLD if self.world_size > 1 and not self.fsdp else None

    def building(self):
        """The context to build the model in: the meta device on the ranks that do not hold weights."""
        return contextlib.nullcontext() if self.holds_weights else torch.device("meta")

    def sync_gradients(self, model: nn.Module) -> None:
        """After backward: average the gradients where no wrapper did (sequence parallelism's double
        averaging, engine/sequence.py); DDP and FSDP2 average in backward."""
        if self.seq_parallel > 1:
            from .sequence import average_gradients
            average_gradients(model)

    @contextlib.contextmanager
    def accumulating(self, step_model: nn.Module, last: bool):
        """Around one micro-batch's forward and backward (--accum-steps): the gradients are averaged over the
        ranks in the step's last one only (DDP's no_sync, FSDP2's gradient sync switched off until the last;
        sequence parallelism averages once, in sync_gradients)."""
        if last or self.world_size == 1:
            yield
        elif isinstance(step_model, nn.parallel.DistributedDataParallel):
            with step_model.no_sync():
                yield
        elif self.fsdp:                                  # FSDP2's module (`wrap` shards the model itself)
            step_model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                step_model.set_requires_gradient_sync(True)
        else:
            yield

    def checkpoint_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict] | None:
        """The state dicts of `model` and `opt` (an optimizer, or engine.optim.Optimizers: several stepped
        as one) as plain full tensors, what a checkpoint holds, on the main process; None on the others.
        Every rank must call it: under FSDP2 the sharded tensors are gathered one at a time to rank 0 and
        moved to its CPU (torch.distributed.checkpoint's full state dict with CPU offload), so no other
        rank ever holds more than its shard and one gathered tensor."""
        if not self.fsdp:
            return (model.state_dict(), opt.state_dict()) if self.is_main else None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, _each(opt), options=options)   # keyed by parameter name
        if not self.is_main:
            return None
        index = {name: i for i, name in enumerate(_param_names(model, opt))}   # the plain layout: by position
        return weights, {"state": {index[k]: v for k, v in optim["state"].items()},
                         "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in optim["param_groups"]]}

    def load_optimizer(self, model: nn.Module, opt: torch.optim.Optimizer, state: dict | None) -> None:
        """Load an optimizer state dict of plain full tensors (`state`, read by the main process; None on
        the others under FSDP2, where each rank receives only its shard, broadcast from rank 0)."""
        state = _current_kernels(opt, state)
        if not self.fsdp:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = _param_names(model, opt)
        by_name = {} if state is None else {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, _each(opt), by_name,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def all_reduce(self, sums: dict[str, float], every_rank: tuple[str, ...] = ()) -> dict[str, float]:
        """Each value summed over the data-parallel groups (in float64), by key: the ranks of a sequence
        group hold the same sums, and one of them counts; the keys in `every_rank` (flags every rank
        decides by: a stop asked, a non-finite loss) are summed over every rank."""
        if self.world_size == 1:
            return dict(sums)
        own = self.rank % self.seq_parallel == 0
        t = torch.tensor([v if own or k in every_rank else 0.0 for k, v in sums.items()], dtype=torch.float64,
                         device=self.device)
        dist.all_reduce(t)
        return dict(zip(sums, t.tolist()))

    def same_everywhere(self, value: float) -> bool:
        """Whether every rank holds the same `value` (e.g. the step a resumed run starts at)."""
        if self.world_size == 1:
            return True
        t = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0].item() == -t[1].item()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, barrier: bool = True) -> None:
        """The end of a run: a barrier, so no rank goes on to leave the group (at exit) while another
        still talks to it (2-process gloo runs otherwise abort at exit); none when this rank ends on an
        error, since the others may be inside a collective."""
        if self.world_size > 1 and dist.is_initialized() and barrier:
            dist.barrier()


def _join_group(backend: str) -> None:
    """Join torchrun's group. After a restart (--max-restarts), torchrun's shared store still holds the
    last attempt's keys, and gloo would dial the addresses of the ranks that died: the keys of each
    attempt are kept apart by a prefix."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt and os.environ.get("RANK") == "0":
        notice(f"pixformer: restart {attempt} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')} after a process "
               "of this run ended; resuming from the last checkpoint")
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pixformer-attempt-{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def _each(opt) -> list[torch.optim.Optimizer]:
    """The optimizers of a run's optimizer: itself, or those of engine.optim.Optimizers (Muon + AdamW)."""
    return getattr(opt, "optimizers", [opt])


def _current_kernels(opt: torch.optim.Optimizer, state: dict | None) -> dict | None:
    """`state` with each group's kernel choice (fused, foreach) as `opt` has it now: torch takes a
    group's settings from the saved state, so a run saved with another choice would resume on it."""
    if state is None:
        return None
    groups = [{**saved, **{k: now[k] for k in ("fused", "foreach") if k in now}}
              for saved, now in zip(state["param_groups"], opt.param_groups)]
    return {**state, "param_groups": groups}


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in its order (a plain optimizer state dict's keys)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process of the run stopped or died."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout"))


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: a GPU's OutOfMemoryError, or the CPU allocator's."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


_SEQUENCE_GROUPS: dict[int, Any] = {}


def _sequence_group(size: int):
    """This rank's group of `size` consecutive ranks, made once per process (every rank makes all)."""
    if size not in _SEQUENCE_GROUPS:
        _SEQUENCE_GROUPS[size] = dist.new_subgroups(group_size=size)[0]
    return _SEQUENCE_GROUPS[size]


def _leave_group() -> None:
    """At exit: leave the process group this process joined (after the last run's barrier)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class RankRandom:
    """A task's training draws for a global batch, this rank's rows kept: a draw whose first dimension
    is the local batch is drawn for the global batch from the shared (seed, step) generator and sliced,
    so N processes see the numbers one process would; other draws (a scalar, a permutation) are
    drawn as they are, the same on every rank. A task therefore draws a number shared by the batch as
    a scalar (size None), never as an array of one, which a one-image part would take for per-image."""

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
