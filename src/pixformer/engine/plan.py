"""Cost planner: tokens, parameters, FLOPs and training memory of a model before running it.

    p = plan("pit-t", img_size=32, batch_size=32, memory="8GiB")
    print(p)                      # the table `pixformer plan` prints
    p.peak_bytes(32, "none")      # training-step peak memory at batch 32
    p.max_batch("none")           # largest batch that fits the memory budget

FLOPs come from the model's own `flops()` (matmuls, a multiply-add counts as 2; training = 3x
forward, plus one more forward of the blocks that full checkpointing recomputes).

Memory is counted, not measured: what autograd keeps for the backward pass, tensor by tensor (the
list below was checked against torch.autograd.graph.saved_tensors_hooks and against the peak of
live tensor bytes of a training step; benchmarks/train_step.py compares it with measured peaks).
For one ViT block, T tokens of width D, MLP width M, H heads; e = bytes of a matmul operand
(4 in fp32, 2 under bf16 autocast), r = 4 (the residual stream stays fp32 under autocast):
    x     block input, kept by LayerNorm 1              r*T*D
    h1    LayerNorm 1 output, kept by the qkv linear    e*T*D
    qkv   kept by attention (q, k, v are views)         e*3*T*D
    out   attention output, kept by attention and proj  e*T*D   (+ the fused kernels' fp32 log-sum-exp 4*H*T)
    x1    residual after attention, kept by LayerNorm 2 r*T*D   (+ each LayerNorm's mean, 1/std: 2*2*4*T)
    h2    LayerNorm 2 output, kept by fc1               e*T*D
    u     MLP hidden before GELU, kept by fc2           e*T*M   (the lean MLP, train's default,
    g     MLP hidden after GELU                         e*T*M    recomputes g in the backward instead:
                                                                 perf.apply_lean_mlp, `lean_mlp`)
  "math" attention keeps the probabilities as well:   e*H*T*T (the fused and blocked kernels never form them)
Checkpointing (perf.apply_activation_checkpointing) changes what a block keeps:
  full       the block input only (r*T*D); its forward runs again during the backward pass
  selective  x and the outputs of the matmuls and attention (qkv, out, proj, fc1, fc2); the norms,
             GELU and residual adds are recomputed (and, under sequence parallelism, the key/value gather)
The peak of a step is then: weights + grads + AdamW state (16 bytes a parameter, +2 for the bf16
weight copies autocast caches) + the batch + everything kept + the working set of the one block whose
backward is running (the MLP hidden gradient e*T*M and the residual gradient r*T*D; under "math" also
two T x T gradients e*2*H*T*T; the recomputed tensors of that block under checkpointing).
Not counted: allocator overhead and fragmentation (the process's RSS is higher; see the benchmark),
per-thread kernel workspaces, the data pipeline.

Across ranks (`seq_parallel` P, `data_parallel` D, `fsdp`), everything is per rank. Under sequence
parallelism (engine/sequence.py) a rank holds Ts = ceil(T / P) tokens: every tensor above is counted
for Ts tokens, and a block also keeps the keys and values gathered from the P shards (e*2*T*D, their
gradient e*2*T*D in the working set), unless it gathers them again in the backward (`seq_regather`,
or checkpointing, selective or full, which recomputes the gather with the block: then they are in its
working set twice, the gathered copy and its gradient, and kept nowhere); "math" keeps e*H*Ts*T
probabilities. With some blocks regathering and others keeping, the peak is the largest, over the
blocks in backward order, of what the blocks not yet done keep plus the running block's working set.
The weights, gradients and AdamW state are replicated (DDP, sequence parallel) or divided by D (FSDP2).
`seq_regather` "auto" (train's default) picks, for each checkpointing mode, the fewest blocks
regathering (the first ones) that bring a rank's activations within REGATHER_TARGET / P of one
device's (the same step with P = 1), or, where none does, the fewest with the least activations.
Communication per rank and step, for ring collectives ((W-1)/W of the data each way):
    gradient all-reduce (DDP, sequence parallel; W = P*D ranks)   2*(W-1)/W * 4*params
    FSDP2 (W = D): weight all-gather in forward and in backward, gradient reduce-scatter  3*(D-1)/D * 4*params
    sequence parallel, per block and image: key/value all-gather in forward, reduce-scatter of their
    gradients in backward, 2 * (P-1)*Ts * 2*D*e (one more all-gather in each block that regathers,
    and one more in every block under checkpointing: two in a checkpointed block that regathers)
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import PixformerError
from ..models import blocks_of
from ..models.attention import AUTO_MATH_SCORES, auto_backend, check_backend
from .perf import autocast_dtype

CHECKPOINT_MODES = ("none", "selective", "full")
SELECTIVE_ABOVE = 1 << 30   # train turns selective checkpointing on above this many bytes of activations (CPU)
REGATHER_TARGET = 1.1       # seq_regather auto: a rank's activations within this / P of one device's
REGATHER_WORDS = ("auto", "all", "none")
_ATTN_LABEL = {"fused": "fused (flash)", "blocked": "blocked", "math": "math"}
_HOW = {"none": "(train --selective-checkpoint false)", "selective": "(train --selective-checkpoint true)",
        "full": "(train --checkpoint-blocks all)"}
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_bytes(size: str | int | float) -> int:
    """'8GiB', '512MiB', '1.5G' (binary), '8GB' (decimal) or a number of bytes -> bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m[2].lower() not in _UNITS:
        raise PixformerError(f"cannot read memory size {size!r}; write e.g. 8GiB, 512MiB or 16GB")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def vit_block_bytes(T: int, D: int, M: int, H: int, e: int, attn: str, mode: str,
                    keys: int | None = None, regather: bool = False, lean_mlp: bool = True,
                    lean_norms: bool = False) -> tuple[int, int]:
    """(bytes kept, bytes of the working set while its backward runs) of one ViT block, one image; T
    tokens, or under sequence parallelism T of a shard attending over `keys` gathered keys (kept, or
    with `regather` gathered again in the backward, as checkpointing does anyway); `lean_mlp`: the MLP
    keeps u alone (GELU(u) recomputed); `lean_norms`: the linear layers after the two norms keep nothing
    of their own (the norms' outputs recomputed, perf.apply_lean_norms)."""
    r = 4
    Tk = keys or T
    lse = 4 * H * T if attn == "fused" else 0   # the fused kernels' log-sum-exp (fp32)
    stats = 2 * 2 * 4 * T                # mean and 1/std of the two LayerNorms (fp32)
    probs = e * H * T * Tk if attn == "math" else 0
    gathered = e * 2 * Tk * D if keys else 0   # the keys and values of every shard (and later their gradient)
    again = regather or mode != "none"   # checkpointing recomputes the gather (selective: not a matmul's output)
    work = e * T * M + r * T * D + (2 * probs if attn == "math" else 0) + gathered * (1 + again)
    gathered = 0 if again else gathered
    normed = 0 if lean_norms else 2 * e * T * D   # the norms' outputs, as the next linear layers keep them
    full = r * T * D + e * 3 * T * D + e * T * D + lse + r * T * D + normed \
        + e * (1 if lean_mlp else 2) * T * M + probs + stats + gathered
    if mode == "none":
        return full, work
    if mode == "selective":
        kept = r * T * D + e * (3 * T * D + T * D + T * D + T * M + T * D) + lse + probs + gathered
        return kept, work + (full - kept)    # the recomputed tensors of the running block
    if mode == "full":
        return r * T * D, work + full        # the running block's forward is redone
    raise PixformerError(f"checkpoint mode must be one of {CHECKPOINT_MODES}, got {mode!r}")


def check_regather(setting: str | int | bool) -> str | int:
    """--seq-regather as "auto", "all", "none" or a number of layers (the first N), or one line saying
    what it takes; true / false (the setting of runs saved before it took a number) mean all / none."""
    if isinstance(setting, bool):
        return "all" if setting else "none"
    if isinstance(setting, str):
        word = {"true": "all", "false": "none"}.get(setting.strip().lower(), setting.strip().lower())
        if word in REGATHER_WORDS or word.isdigit():
            return int(word) if word.isdigit() else word
    elif isinstance(setting, int) and setting >= 0:
        return setting
    raise PixformerError(f"--seq-regather must be auto, all, none or a number of layers, got {setting!r}")


def regather_count(setting: str | int | bool, depth: int) -> int | None:
    """How many layers (the first) an explicit --seq-regather gathers again in the backward, out of
    `depth`; None for "auto", which the planner decides (plan)."""
    setting = check_regather(setting)
    if isinstance(setting, int) and setting > depth:
        raise PixformerError(f"--seq-regather {setting} is more layers than the model's {depth}")
    return {"auto": None, "all": depth, "none": 0}.get(setting, setting)


def stack_bytes(blocks: list[tuple[int, int]], outside: int = 0) -> int:
    """Peak bytes of a stack of blocks, each (kept, working set) as vit_block_bytes gives them: the
    largest, over the blocks in backward order (the last first), of what the blocks not yet done keep
    plus the running block's working set; `outside` is kept throughout."""
    held, peak = sum(kept for kept, _ in blocks), 0
    for kept, work in reversed(blocks):
        peak = max(peak, held + work)
        held -= kept
    return peak + outside


@dataclass
class Plan:
    model: str
    img_size: tuple[int, int]
    tokens: int                  # patch tokens (pixels for PiT)
    seq_len: int                 # tokens through the blocks (+1 with a class token)
    params: int
    fwd_flops: int               # per image
    train_flops: int             # per image: forward + backward (2x forward)
    train_flops_full_ckpt: int   # per image, with every block checkpointed (one more forward of the blocks)
    precision: str               # fp32 | bf16
    attn: str                    # fused | blocked | math
    fixed_bytes: int             # weights, grads, optimizer state (independent of the batch)
    image_bytes: dict[str, int] = field(default_factory=dict)  # per image, by checkpoint mode
    batch_size: int | None = None  # the global batch (each data-parallel group trains batch / D images)
    memory: int | None = None      # per rank
    seq_parallel: int = 1          # P ranks per image (sequence parallelism)
    data_parallel: int = 1         # D groups training different images
    fsdp: bool = False             # weights, gradients and optimizer state sharded over D
    comm: dict[str, int] = field(default_factory=dict)   # bytes sent per rank per step, by kind
    depth: int = 0                 # blocks (layers)
    regather_layers: dict[str, int] = field(default_factory=dict)  # sequence parallel, by checkpointing mode:
    #                                how many layers (the first) gather their keys and values again in backward
    one_device_bytes: dict[str, int] = field(default_factory=dict)  # per image on one device (P = 1), by mode
    gather_bytes: int = 0          # bytes a rank sends in one layer's key/value all-gather of a step

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.image_bytes:
            d["peak_bytes"] = {m: self.peak_bytes(self.batch_size, m) for m in CHECKPOINT_MODES} \
                if self.batch_size else None
            d["max_batch"] = {m: self.max_batch(m) for m in CHECKPOINT_MODES} if self.memory else None
        return d

    @property
    def images_per_rank(self) -> int:
        return -(-self.batch_size // self.data_parallel) if self.batch_size else 1

    def peak_bytes(self, batch_size: int, mode: str = "none") -> int:
        """Estimated peak memory of one rank in one training step (forward, backward, AdamW) for a global
        batch of `batch_size` (each rank holds batch / D images, or its shard of each)."""
        if not self.image_bytes:
            raise PixformerError(f"the memory planner does not model {self.model!r}")
        return self.fixed_bytes + -(-batch_size // self.data_parallel) * self.image_bytes[mode]

    def max_batch(self, mode: str = "none", memory: int | str | None = None) -> int:
        """Largest batch whose training step fits `memory` (default: the plan's); 0 if none does."""
        memory = parse_bytes(memory) if memory is not None else self.memory
        if memory is None:
            raise PixformerError("no memory budget given")
        if not self.image_bytes:
            raise PixformerError(f"the memory planner does not model {self.model!r}")
        return max((memory - self.fixed_bytes) // self.image_bytes[mode], 0) * self.data_parallel

    def __str__(self) -> str:
        h, w = self.img_size
        lines = [f"{self.model} at {h}x{w}: {self.tokens:,} tokens"
                 + (" (+1 class token)" if self.seq_len > self.tokens else "") + f", {self.params:,} parameters",
                 f"GFLOPs per image: forward {self.fwd_flops / 1e9:.3f}, training {self.train_flops / 1e9:.3f} "
                 f"({self.train_flops_full_ckpt / 1e9:.3f} with every block checkpointed)"]
        if not self.image_bytes:
            return "\n".join(lines + ["training memory: not modelled for this architecture (ViT/PiT only)"])
        lines += [f"training memory, {self.precision}, {_ATTN_LABEL[self.attn]} attention "
                 f"(estimate; see pixformer.engine.plan):",
                 f"  weights + grads + AdamW state: {format_bytes(self.fixed_bytes)}"]
        b = self.batch_size
        names = {m: f"{m:<9} {_HOW[m]}" for m in CHECKPOINT_MODES}
        w = max(map(len, names.values()))
        lines.append(f"  {'checkpointing':<{w}} {'per image':>11}" + (f" {'batch ' + str(b):>11}" if b else "")
                     + (f" {'max batch in ' + format_bytes(self.memory):>20}" if self.memory else ""))
        for mode in CHECKPOINT_MODES:
            row = f"  {names[mode]:<{w}} {format_bytes(self.image_bytes[mode]):>11}"
            if b:
                row += f" {format_bytes(self.peak_bytes(b, mode)):>11}"
            if self.memory:
                row += f" {self.max_batch(mode):>20,}"
            lines.append(row + ("   <- train's default" if b and mode == self.default_mode() else ""))
        if self.memory:
            lines.append(self.verdict())
        if self.seq_parallel * self.data_parallel > 1:
            lines.append(f"per rank of {self.seq_parallel * self.data_parallel} (sequence parallel {self.seq_parallel} x "
                         f"data parallel {self.data_parallel}{', FSDP2' if self.fsdp else ''}): "
                         f"{-(-self.seq_len // self.seq_parallel):,} tokens of each image, {self.images_per_rank} "
                         f"image(s) a step; communication a step: "
                         + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in self.comm.items()))
        if self.seq_parallel > 1:
            lines.append(self.regather_line())
        return "\n".join(lines)

    def train_mode(self) -> str:
        """The checkpointing train uses unless told: default_mode at the plan's batch, none without one."""
        return self.default_mode() if self.batch_size and self.image_bytes else "none"

    def regather_line(self, mode: str | None = None) -> str:
        """One line for sequence parallelism under checkpointing `mode` (default: train's): the layers that
        keep the keys and values gathered from the shards, those that gather them again in the backward,
        and what that costs."""
        mode = mode or self.train_mode()
        R, L, more = self.regather_layers[mode], self.depth, self.more_gathers(mode)
        if mode != "none":
            where = (f"blocks checkpointed {'in full' if mode == 'full' else 'selectively'} keep no gathered "
                     "keys/values, their backward gathers them again" + (f" (in {R} layers twice)" if R else ""))
        elif 0 < R < L:
            where = f"keys/values kept in {L - R} of {L} layers, gathered again in {R}"
        else:
            where = f"keys/values {'gathered again' if R else 'kept'} in all {L} layers"
        cost = (f"; {more} more all-gather{'s' * (more > 1)} of {format_bytes(self.gather_bytes)} a rank a step"
                if more else "")
        return (f"sequence parallel P={self.seq_parallel}: {where} (activations ~"
                f"{self.image_bytes[mode] / self.one_device_bytes[mode]:.2f}x of one device's{cost})")

    def more_gathers(self, mode: str | None = None) -> int:
        """Key/value all-gathers of a step beyond the forward's one a layer, under checkpointing `mode`
        (default: train's): one in each layer that regathers, and one in every layer under checkpointing."""
        mode = mode or self.train_mode()
        return self.regather_layers[mode] + (self.depth if mode != "none" else 0)

    def default_mode(self, above: int = SELECTIVE_ABOVE) -> str:
        """The checkpointing `train` uses at the plan's batch size unless told: selective once the
        activations of a step exceed `above` (selective_above: 1 GiB on a CPU), else none."""
        if not self.batch_size or not self.image_bytes:
            raise PixformerError("train's default checkpointing needs a batch size and a modelled architecture")
        return "selective" if self.images_per_rank * self.image_bytes["none"] > above else "none"

    def verdict(self) -> str:
        """One line: whether (and how) the batch fits the memory budget, or what would be needed."""
        mem = format_bytes(self.memory)
        if self.max_batch("full") == 0:
            need = self.peak_bytes(1, "full")
            return (f"nothing fits in {mem}: one image with every block checkpointed needs "
                    f"{format_bytes(need)}; give at least that much memory or a smaller image")
        if not self.batch_size:
            return (f"largest batch in {mem}: {self.max_batch('selective')} with selective checkpointing, "
                    f"{self.max_batch('full')} with --checkpoint-blocks all")
        for mode in ("none", "selective", "full"):
            if self.peak_bytes(self.batch_size, mode) <= self.memory:
                return f"batch {self.batch_size} fits in {mem} with checkpointing {mode} {_HOW[mode]}"
        need = self.peak_bytes(self.batch_size, "full")
        return (f"batch {self.batch_size} does not fit in {mem} even with --checkpoint-blocks all (it needs "
                f"{format_bytes(need)}); the largest batch that fits is {self.max_batch('full')}"
                + self._micro_batches())

    def _micro_batches(self) -> str:
        """'; batch B trains in N micro-batches: --accum-steps N ...' with the fewest micro-batches that fit
        under selective checkpointing (else every block checkpointed), naming the checkpointing when train
        would not choose it by itself for a micro-batch that small; '' when not even one image fits."""
        for mode in ("selective", "full"):
            fits = self.max_batch(mode)
            if fits:
                accum = -(-self.batch_size // fits)
                micro = -(-self.images_per_rank // accum)
                if self.peak_bytes(micro * self.data_parallel, "none") <= self.memory:
                    needs = ""
                elif mode == "full":
                    needs = " --checkpoint-blocks all"
                elif micro * self.image_bytes["none"] > SELECTIVE_ABOVE:
                    needs = ""                                  # train turns selective checkpointing on itself
                else:
                    needs = " --selective-checkpoint true"
                return f"; batch {self.batch_size} trains in {accum} micro-batches: --accum-steps {accum}{needs}"
        return ""


def attention_memory_kind(backend: str, e: int, scores: int | None) -> str:
    """How an attention backend keeps memory: "math" (the N x N probabilities), "blocked", or "fused"
    (SDPA's kernels). "auto" is resolved as attention.auto_backend does on CPU for `scores` (B*H*T*T;
    None, no batch given: blocked, what large batches get)."""
    if check_backend(backend) == "auto":
        backend = auto_backend("cpu", torch.bfloat16 if e == 2 else torch.float32,
                               scores if scores is not None else AUTO_MATH_SCORES + 1)
    return backend if backend in ("math", "blocked") else "fused"


def plan(model: str, img_size: int | tuple[int, int] = 32, batch_size: int | None = None,
         memory: int | str | None = None, precision: str = "fp32", attn_backend: str = "auto",
         num_classes: int = 10, in_chans: int = 3, seq_parallel: int = 1, data_parallel: int = 1,
         fsdp: bool = False, seq_regather: str | int | bool = "auto", lean_mlp: bool = True,
         lean_norms: bool = False, **overrides) -> Plan:
    """Tokens, parameters, FLOPs and training-memory estimate of a named model (see the module doc),
    per rank of `seq_parallel` x `data_parallel` ranks. `precision` is fp32, bf16 or auto (what
    `train` would use on this machine's CPU); `seq_regather`, `lean_mlp` and `lean_norms` as train's settings."""
    from ..models.registry import create_model
    from .runtime import check_combination

    if batch_size is not None and batch_size < 1:
        raise PixformerError(f"batch size must be at least 1, got {batch_size}")
    if seq_parallel < 1 or data_parallel < 1:
        raise PixformerError(f"--seq-parallel and --data-parallel count ranks (at least 1), got {seq_parallel}, "
                             f"{data_parallel}")
    check_combination(seq_parallel, fsdp)
    img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    with torch.device("meta"):
        net = create_model(model, img_size=img, num_classes=num_classes, in_chans=in_chans, **overrides)
    cfg = net.cfg
    e = 2 if autocast_dtype(precision, "cpu", quiet=True) == torch.bfloat16 else 4
    n = (img[0] // cfg.patch_size) * (img[1] // cfg.patch_size)
    T = n + (getattr(cfg, "pool", None) == "cls")
    if seq_parallel > 1 and not hasattr(cfg, "heads"):
        raise PixformerError(f"sequence parallelism splits a ViT's tokens; {model} is not a ViT")
    if n < seq_parallel:
        raise PixformerError(f"{n} tokens cannot be split over {seq_parallel} sequence-parallel ranks")
    Ts = -(-T // seq_parallel)                  # the tokens of each image a rank holds
    heads = getattr(cfg, "heads", 1)
    local = -(-batch_size // data_parallel) if batch_size else None
    attn = attention_memory_kind(attn_backend, e, local * heads * Ts * T if local else None)
    params = sum(p.numel() for p in net.parameters())
    fwd = net.flops(img)
    with torch.device("meta"):
        blocks_fwd = fwd - create_model(model, img_size=img, num_classes=num_classes, in_chans=in_chans,
                                        **{**overrides, "depth": 0}).flops(img)  # what full checkpointing redoes
    fixed, image_bytes = (16 * params + (2 * params if e == 2 else 0)) // (data_parallel if fsdp else 1), {}
    depth = len(blocks_of(net))
    explicit = regather_count(seq_regather, depth) if seq_parallel > 1 else 0
    one_device, regather = {}, {}
    if hasattr(cfg, "heads"):                   # a ViT / PiT: count what its blocks keep
        D, H, M = cfg.dim, cfg.heads, int(cfg.dim * cfg.mlp_ratio)
        images = 4 * in_chans * img[0] * img[1]
        one_attn = attention_memory_kind(attn_backend, e, local * heads * T * T if local else None)
        for mode in CHECKPOINT_MODES:
            one_device[mode] = stack_bytes([vit_block_bytes(T, D, M, H, e, one_attn, mode, lean_mlp=lean_mlp,
                                                              lean_norms=lean_norms)] * depth, 4 * T * D + images)
            keys = T if seq_parallel > 1 else None
            blocks = [vit_block_bytes(Ts, D, M, H, e, attn, mode, keys, again, lean_mlp, lean_norms)
                      for again in (False, True)]
            cost = {R: stack_bytes([blocks[1]] * R + [blocks[0]] * (depth - R), 4 * Ts * D + images)
                    for R in range(depth + 1)}   # the final norm's input and the images kept throughout
            fits = [R for R in cost if cost[R] <= REGATHER_TARGET / seq_parallel * one_device[mode]]
            regather[mode] = explicit if explicit is not None else fits[0] if fits else min(cost, key=cost.get)
            image_bytes[mode] = cost[regather[mode]]
    world, grads, comm = seq_parallel * data_parallel, 4 * params, {}
    if fsdp:
        comm["fsdp_weights_and_gradients"] = 3 * (data_parallel - 1) * grads // data_parallel
    elif world > 1:
        comm["gradient_all_reduce"] = 2 * (world - 1) * grads // world
    gather = (seq_parallel - 1) * Ts * 2 * getattr(cfg, "dim", 0) * e * (local or 1)
    p = Plan(model=model, img_size=img, tokens=n, seq_len=T, params=params, fwd_flops=fwd,
             train_flops=3 * fwd, train_flops_full_ckpt=3 * fwd + blocks_fwd,
             precision="bf16" if e == 2 else "fp32", attn=attn, fixed_bytes=fixed, image_bytes=image_bytes,
             batch_size=batch_size, memory=parse_bytes(memory) if memory is not None else None,
             seq_parallel=seq_parallel, data_parallel=data_parallel, fsdp=fsdp, comm=comm, depth=depth,
             regather_layers=regather, one_device_bytes=one_device, gather_bytes=gather)
    if seq_parallel > 1 and hasattr(cfg, "heads"):
        comm["key_value_gathers"] = (2 * depth + p.more_gathers()) * gather
    return p


def largest_side(model: str, memory: int | str, mode: str = "full", **settings) -> int:
    """The longest side of a square image (a multiple of the patch) whose training step fits `memory`
    per rank under plan's `settings` (one image per data-parallel group unless `batch_size` is set);
    0 if none does."""
    from ..models.registry import setting
    budget = parse_bytes(memory)
    step = setting(model, settings, "patch_size")
    batch = settings.pop("batch_size", None) or settings.get("data_parallel", 1)

    def fits(k: int) -> bool:                 # side k * step
        if k * k < settings.get("seq_parallel", 1):
            return True                       # below one token per rank: smaller than anything asked
        return plan(model, k * step, batch, budget, **settings).peak_bytes(batch, mode) <= budget

    hi = 1
    while fits(hi) and hi < 1 << 14:
        hi *= 2
    lo = hi // 2                              # fits(lo) or lo == 0; not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step if lo * lo >= settings.get("seq_parallel", 1) else 0    # 0: nothing fits


def blocks_peak_bytes(model: torch.nn.Module, tokens: list[int], batch_size: int, precision: str = "auto",
                      attn_backend: str = "auto", lean_mlp: bool = True, lean_norms: bool = False) -> int:
    """The activation peak of `batch_size` images through the blocks of a built `model` without
    checkpointing, block i (blocks_of order) at its own sequence length tokens[i] and its own width and
    heads: for a model whose blocks see different sequences (MAE's encoder the visible tokens, its
    decoder every position at another width)."""
    e = 2 if autocast_dtype(precision, "cpu", quiet=True) == torch.bfloat16 else 4
    found = blocks_of(model)
    if len(found) != len(tokens):
        raise PixformerError(f"{len(tokens)} sequence lengths for the {len(found)} blocks of {type(model).__name__}")
    per_block = []
    for block, T in zip(found, tokens):
        D, H, M = block.mlp[0].in_features, block.attn.heads, block.mlp[0].out_features
        attn = attention_memory_kind(attn_backend, e, batch_size * H * T * T)
        per_block.append(vit_block_bytes(T, D, M, H, e, attn, "none", lean_mlp=lean_mlp, lean_norms=lean_norms))
    return batch_size * stack_bytes(per_block)


def selective_above(device: torch.device | str = "cpu") -> int:
    """The activations of a step above which train turns selective checkpointing on. On a CPU 1 GiB
    (SELECTIVE_ABOVE): below that the memory it saves hardly matters and its fixed cost per op (a Python
    dispatch mode over each op of a block) is a large share of a short step (PiT-T at 8x8, batch 32,
    bf16 ran 18-33 % slower with it, while at 32x32 the two were within run-to-run noise:
    benchmarks/results/switches). On a GPU half its memory: recomputing costs time there while the step
    fits, and the per-op dispatch weighs on short kernels (not measured on a GPU; the GPU suite's eager
    and plain step parts compare the two)."""
    device = torch.device(device)
    if device.type == "cuda":
        return max(SELECTIVE_ABOVE, torch.cuda.get_device_properties(device).total_memory // 2)
    return SELECTIVE_ABOVE


def device_memory(device: torch.device | str) -> int | None:
    """All the memory of `device`: a GPU's, or this machine's RAM for the CPU (None where unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def selective_pays(model: str, img_size: int | tuple[int, int], batch_size: int, precision: str = "auto",
                   attn_backend: str = "auto", num_classes: int = 10, in_chans: int = 3,
                   above: int = SELECTIVE_ABOVE, **overrides) -> bool:
    """train's default for selective checkpointing (selective_checkpoint unset): on when this planner puts
    the activations of a step without checkpointing above `above` (selective_above of the device)."""
    p = plan(model, img_size, batch_size, precision=precision, attn_backend=attn_backend, num_classes=num_classes,
             in_chans=in_chans, **overrides)
    return bool(p.image_bytes) and p.default_mode(above) == "selective"
