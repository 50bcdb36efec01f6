"""What a run's optimizer is and how its learning rate moves: the parameter groups (weight decay by
role, layer-wise lr decay), the optimizer (--optimizer adamw | lamb | muon) and the learning rate at
each step (--lr-schedule cosine | linear | one-cycle), a pure function of the step so that a resumed
run takes the same steps as an uninterrupted one.

    opt = build_optimizer(model, cfg)                  # over param_groups(model, ...), each with lr_scale
    lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr, cfg.lr_schedule)
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]

Muon is two optimizers, Muon for the blocks' weight matrices and AdamW for the rest, which
`Optimizers` steps and checkpoints as one.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..errors import PixformerError
from ..models import blocks_of
from .perf import native_bf16

if TYPE_CHECKING:
    from .config import TrainConfig

OPTIMIZERS = ("adamw", "lamb", "muon")
LR_SCHEDULES = ("cosine", "linear", "one-cycle")
ONE_CYCLE_START = 25.0    # one-cycle starts at lr / 25 (torch's OneCycleLR div_factor)


# ---- the learning rate at each step ----------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, peak: float, floor: float, shape: str = "cosine") -> float:
    """The learning rate of step `step` of `total`, a pure function of the step. cosine: linear warm-up
    to `peak` over `warmup` steps, then cosine decay to `floor` at step `total`; linear: the same
    warm-up, then linear decay to `floor`; one-cycle: torch's OneCycleLR (cosine annealing from
    peak / 25 up to `peak` at step warmup - 1, then cosine annealing down to `floor` at step total - 1)."""
    if shape == "one-cycle":
        return _one_cycle(step, total, warmup, peak, floor)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    if shape == "linear":
        return floor + (peak - floor) * (1 - t)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def _one_cycle(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """OneCycleLR's two cosine phases (pct_start = warmup / total, div_factor 25, its final lr `floor`)."""
    top = max(warmup - 1, 0)                                            # the step at the peak
    if step <= top:
        return _anneal(peak / ONE_CYCLE_START, peak, step / top if top else 1.0)
    return _anneal(peak, floor, min((step - top) / max(total - 1 - top, 1), 1.0))


def _anneal(start: float, end: float, t: float) -> float:
    """Cosine annealing from `start` (t = 0) to `end` (t = 1), as OneCycleLR's anneal_strategy='cos'."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * t) + 1)


# ---- parameter groups ------------------------------------------------------------------------
DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """The optimizer's groups. Weight decay by role: on the weights of linear and convolution layers
    only; none on biases, norms, position tables, class and mask tokens, whatever their shape.
    Layer-wise lr decay by depth: with L blocks (found by type), a parameter of block i (0-based) gets
    lr_scale = layer_decay^(L - i), one registered before the blocks (embeddings) layer_decay^(L + 1),
    one after them (final norm, head) 1. Frozen parameters are left out."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED)}
    blocks = blocks_of(model)
    depth_of = {id(p): i + 1 for i, b in enumerate(blocks) for p in b.parameters()}
    groups: dict[tuple[float, float], list] = {}
    after_blocks = False
    for p in model.parameters():
        layer = depth_of.get(id(p))
        after_blocks = after_blocks or layer is not None
        if not p.requires_grad:
            continue
        layer = layer if layer is not None else (len(blocks) + 1 if after_blocks else 0)
        key = (weight_decay if id(p) in decay else 0.0, layer_decay ** (len(blocks) + 1 - layer))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale}
            for (wd, scale), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))]


def muon_matrices(model: nn.Module) -> set[int]:
    """The ids of the parameters Muon updates: the weight matrices of the linear layers inside the
    blocks (attention's projections, the MLPs, adaLN's modulation) and the filter banks of their
    convolutions, each an out x (in / groups * k * k) matrix (ConvMixer's pointwise and depthwise ones).
    Embeddings (the stem), the head, biases, norms, tokens and position tables are AdamW's (the recipe
    of Muon's authors)."""
    return {id(m.weight) for b in blocks_of(model) for m in b.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad}


# ---- the optimizer ---------------------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: "TrainConfig", replicas: Any = None) -> "torch.optim.Optimizer | Optimizers":
    """The run's optimizer (--optimizer) over param_groups(model, ...): AdamW, LAMB, or Muon for the
    blocks' weight matrices with AdamW for the rest (one `Optimizers`). Muon's lr is adjusted per matrix
    to give updates of AdamW's typical RMS (torch's adjust_lr_fn="match_rms_adamw": lr * 0.2 *
    sqrt(max(rows, cols))), so one --lr, schedule and --weight-decay serve both. `replicas`: the process
    group whose ranks hold the same whole parameters (`Runtime.replicas`), over which Muon shares out
    its iteration."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    betas = tuple(cfg.betas)
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=betas)
    if cfg.optimizer == "adamw":
        return adamw(groups, lr=cfg.lr, betas=betas)
    matrices = muon_matrices(model)
    mats = [{**g, "params": [p for p in g["params"] if id(p) in matrices]} for g in groups]
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in matrices]} for g in groups]
    mats, rest = [g for g in mats if g["params"]], [g for g in rest if g["params"]]
    if not mats:
        raise PixformerError(f"--optimizer muon updates the weight matrices of the blocks' linear layers and "
                             f"convolutions; this {type(model).__name__} trains none: use --optimizer adamw or lamb")
    muon = StackedMuon(mats, replicas=replicas, lr=cfg.lr, adjust_lr_fn="match_rms_adamw")   # momentum 0.95, Nesterov, 5 NS steps
    return Optimizers(muon, *([adamw(rest, lr=cfg.lr, betas=betas)] if rest else []))


def adamw(params, **settings) -> torch.optim.AdamW:
    """torch's AdamW (parameters or groups) with its fused kernel: one pass over each tensor and no
    temporaries, where torch's CPU default steps tensor by tensor and foreach=True builds whole lists
    of intermediates (benchmarks/adamw_step.py times the three)."""
    return torch.optim.AdamW(params, fused=True, **settings)


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor (FSDP2's shards), asked without importing torch.distributed.tensor (0.9 s
    at start-up): where nothing has imported it, nothing can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class StackedMuon(torch.optim.Muon):
    """torch's Muon (same defaults, state and checkpoint: a momentum buffer per matrix) with the
    Newton–Schulz iteration run once for all the matrices of one shape, as batched matmuls, rather than
    one matrix at a time: a ViT's blocks hold a few shapes many times over, and at these sizes torch's
    per-matrix calls are mostly overhead (benchmarks/muon_step.py: 1.62x torch's speed on vit-n/4's 24).
    Written here because torch's Muon has no batched or foreach path (it refuses foreach=True), nor
    convolutions: a filter bank (out, in, k, k) is updated as the out x (in * k * k) matrix it is.
    `ns_dtype`: the iteration's dtype; None: bf16 (torch's) where the parameters' device computes in bf16
    natively, else fp32 (a CPU without AVX512-BF16 or AMX emulates bf16 products: on an AMD EPYC (AVX2),
    vit-n/4's iteration takes 1.1 s in bf16 and 0.07 s in fp32). A sharded matrix (FSDP's DTensor) is
    stepped on its shard, its iteration on the whole matrix gathered, run by one rank and its rows
    scattered (`_orthogonalize`). `replicas`: a process group whose ranks hold the same whole matrices
    and gradients (DDP, sequence parallelism): the iteration of each is run by one of them and the
    results all-gathered, rather than every rank running all of them."""

    def __init__(self, params, ns_dtype: torch.dtype | None = None, replicas: Any = None, **settings):
        defaults = torch.optim.Muon([torch.zeros(1, 1)], **settings).defaults   # torch's checks and defaults
        torch.optim.Optimizer.__init__(self, params, defaults)                  # (torch's refuses > 2-D)
        self.ns_dtype, self.replicas = ns_dtype, replicas
        for group in self.param_groups:
            if any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon updates matrices and filter banks (2-D or more), not vectors")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, momentum = float(group["lr"]), group["momentum"]
            grads = [_local(p.grad) for p in params]                          # a shard's rows, or the whole
            bufs = [_local(self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))) for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            dtype = self.ns_dtype or (torch.bfloat16 if native_bf16(grads[0].device) else torch.float32)
            orthogonal = _orthogonalize(params, updates, group, dtype, self.replicas)
            torch._foreach_mul_([_local(p) for p in params], 1 - lr * group["weight_decay"])
            for p, update in zip(params, orthogonal):
                matrix = (p.shape[0], math.prod(p.shape[1:]))                 # the whole matrix's: its lr
                _local(p).add_(update.view_as(_local(p)), alpha=-_muon_lr(lr, group["adjust_lr_fn"], matrix))
        return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (sharing its storage: in-place changes are the DTensor's), else `t`."""
    return t.to_local() if is_dtensor(t) else t


def _orthogonalize(params: list[torch.Tensor], updates: list[torch.Tensor], group: dict,
                   dtype: torch.dtype, replicas: Any = None) -> list[torch.Tensor]:
    """Muon's update of each parameter (as its `updates` entry: local rows of a shard): whole matrices
    stacked by shape through `newton_schulz`, dealt out over the ranks of `replicas` if given. A shard's
    matrix is gathered whole on every rank, but iterated on one only, its owner (the sharded matrices
    dealt round-robin over the ranks, each owner's stacked by shape), which then scatters each rank its
    rows of the result: the iteration's work is split over the ranks instead of repeated on each, for one
    scatter per matrix."""
    from_ns = lambda mats: newton_schulz(mats, group["ns_coefficients"], group["ns_steps"],   # noqa: E731
                                         group["eps"], dtype)
    whole = [i for i, p in enumerate(params) if not is_dtensor(p)]
    mats = [updates[i].flatten(1) for i in whole]                             # a filter bank: out x (in * k * k)
    out = dict(zip(whole, _dealt(mats, from_ns, dtype, replicas) if replicas is not None else from_ns(mats)))
    sharded = [i for i in range(len(params)) if i not in out]
    if not sharded:
        return [out[i] for i in range(len(params))]
    from torch.distributed.tensor import DTensor, distribute_tensor
    owner = {i: n % _owners(params[i].device_mesh) for n, i in enumerate(sharded)}
    mine = []
    for i in sharded:
        p = params[i]
        full = DTensor.from_local(updates[i], p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        if _is_rank(p.device_mesh, owner[i]):
            mine.append((i, full.flatten(1)))
    result = dict(zip((i for i, _ in mine), from_ns([m for _, m in mine])))
    for i in sharded:
        p = params[i]
        whole_result = result[i].view(p.shape) if i in result else updates[i].new_empty(p.shape, dtype=dtype)
        out[i] = distribute_tensor(whole_result, p.device_mesh, p.placements, src_data_rank=owner[i]).to_local()
    return [out[i] for i in range(len(params))]


def _dealt(mats: list[torch.Tensor], from_ns: Callable, dtype: torch.dtype, replicas: Any) -> list[torch.Tensor]:
    """from_ns(mats) (results in `dtype`) with the work shared over the ranks of `replicas`, which all hold
    the same `mats`: the matrices of each shape dealt round-robin, each rank iterating its own (stacked),
    then one all-gather per shape (each rank's results padded to the same count) gives every rank all."""
    import torch.distributed as dist
    W, r = dist.get_world_size(replicas), dist.get_rank(replicas)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(mats)
    for shape, index in by_shape.items():
        mine = from_ns([mats[i] for i in index[r::W]])
        share = mats[index[0]].new_zeros(-(-len(index) // W), *shape, dtype=dtype)
        for j, m in enumerate(mine):
            share[j] = m
        shares = [torch.empty_like(share) for _ in range(W)]
        dist.all_gather(shares, share, group=replicas)                     # (count, rows, cols) from each rank
        for rank in range(W):
            for j, i in enumerate(index[rank::W]):
                out[i] = shares[rank][j]
    return out


def _owners(mesh) -> int:
    """How many ranks of `mesh` can own a matrix: rank r owns where its coordinate is r in every dimension
    (DTensor's scatter sends from the same group rank along each), so min(mesh.shape) of them."""
    return min(mesh.shape)


def _is_rank(mesh, r: int) -> bool:
    return all(c == r for c in mesh.get_coordinate())


def newton_schulz(mats: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """torch's Muon iteration (in `dtype`, torch's bf16 by default; each matrix turned wide, scaled to unit
    Frobenius norm, then `steps` quintic steps X <- aX + (bA + cA^2)X with A = XX^T) on one stack per
    shape; the results in the order and shapes given. A tall matrix is turned wide as a transposed view
    and scaled in place, as torch's step does it: where bf16 products are emulated (CPUs without
    AVX512-BF16 or AMX) a contiguous copy came out up to 4e-5 off torch's parameters (vit-n/4, 43 steps),
    so tall and wide matrices of one wide shape are not stacked together."""
    a, b, c = coefficients
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(mats)
    for shape, index in by_shape.items():
        tall = shape[0] > shape[1]
        x = torch.stack([mats[i] for i in index]).to(dtype)                  # (k, rows, cols)
        x = x.mT if tall else x                                               # (k, short, long)
        x.div_(x.norm(dim=(1, 2), keepdim=True).clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.mT                                                   # (k, short, short)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for j, i in enumerate(index):
            out[i] = x[j].mT if tall else x[j]
    return out


def _muon_lr(lr: float, adjust: str | None, shape: tuple[int, ...]) -> float:
    """The per-matrix lr of torch's Muon (its adjust_lr_fn: "original", "match_rms_adamw" or None)."""
    rows, cols = shape[:2]
    if adjust == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols)) if adjust in (None, "original") else lr


class Optimizers:
    """Several optimizers over disjoint parameters, stepped as one: their groups in turn as
    `param_groups` (each keeps its lr_scale), and one state dict in the layout of a single optimizer
    over all those groups (the parameters numbered on from one optimizer to the next), which is what a
    checkpoint holds. `optimizers` is what torch.distributed.checkpoint's optimizer state dicts take."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def _spans(self) -> list[tuple[torch.optim.Optimizer, int, int]]:
        """(optimizer, its first parameter's number, its number of parameters) for each in turn."""
        spans, first = [], 0
        for o in self.optimizers:
            n = sum(len(g["params"]) for g in o.param_groups)
            spans.append((o, first, n))
            first += n
        return spans

    def state_dict(self) -> dict[str, Any]:
        state, groups = {}, []
        for o, first, _ in self._spans():
            sd = o.state_dict()
            state.update({first + i: v for i, v in sd["state"].items()})
            groups += [{**g, "params": [first + i for i in g["params"]]} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = iter(state_dict["param_groups"])
        for o, first, n in self._spans():
            mine = [next(groups) for _ in o.param_groups]
            o.load_state_dict({"state": {i - first: v for i, v in state_dict["state"].items() if first <= i < first + n},
                               "param_groups": [{**g, "params": [i - first for i in g["params"]]} for g in mine]})


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), as timm and apex implement
    it: Adam's moments with bias correction, the decoupled weight decay added to the update, and on the
    decayed parameters the update scaled by the trust ratio ||w|| / ||update|| (1 where either norm is
    0); biases, norms and tokens (no decay) take Adam's step. Gradient clipping stays the loop's.
    Written here because torch ships no LAMB and timm is not a dependency (one tensor at a time)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), wd = group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                update = (m / (1 - beta1 ** t)).div_(denom)
                if wd != 0:
                    update.add_(p, alpha=wd)
                    w_norm, u_norm = p.norm(), update.norm()
                    update.mul_(torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0))
                p.add_(update, alpha=-group["lr"])
        return loss
