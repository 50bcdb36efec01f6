"""Speed and memory switches, applied to a built model from outside it (torchtitan style).

    model = create_model("pit-t", img_size=32)
    apply_activation_checkpointing(model, "all")   # or the first N blocks; selective=True for the rest
    apply_compile(model)                           # torch.compile, block by block
    dtype = autocast_dtype("auto", device)         # bf16 where the hardware has it natively

Neither the model file nor its state_dict changes: checkpoints written with these switches on load
into a plain model.
"""
from __future__ import annotations

import ctypes
import functools
import platform

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .errors import PixformerError


def checkpoint_count(blocks: int | str | None, depth: int) -> int:
    """How many blocks `blocks` ("all", "none", an int, or its string) means in a model of `depth`."""
    if blocks is None or blocks is False or (isinstance(blocks, str) and blocks.strip().lower() in ("none", "0", "")):
        return 0
    if isinstance(blocks, str) and blocks.strip().lower() == "all":
        return depth
    try:
        n = int(blocks)
    except (TypeError, ValueError):
        raise PixformerError(f"checkpoint blocks must be 'all' or a number of blocks, got {blocks!r}") from None
    if not 0 <= n <= depth:
        raise PixformerError(f"cannot checkpoint {n} blocks: the model has {depth}")
    return n


# Selective checkpointing keeps the outputs of these (the matmuls and attention) and recomputes the
# cheap elementwise ops between them (norms, GELU, residual adds) in the backward pass.
_aten = torch.ops.aten
_KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
         _aten._scaled_dot_product_flash_attention_for_cpu.default,
         _aten._scaled_dot_product_flash_attention.default,
         _aten._scaled_dot_product_efficient_attention.default,
         _aten._scaled_dot_product_cudnn_attention.default}


def _keep_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, blocks: int | str = "all", selective: bool = False) -> nn.Module:
    """Trade compute for activation memory, block by block (applied again, it replaces the old choice).

    blocks     the first `blocks` blocks ("all" or N) are checkpointed in full: a block keeps only its
               input and runs its forward again in the backward pass (+1/3 compute for those blocks)
    selective  every other block keeps the outputs of its matmuls and attention, and recomputes only
               the cheap ops between them (norms, GELU, residual adds): -30% activation memory for a
               ViT block, at ~2% of the step time on CPU

    The block's own forward is wrapped, so parameter names and checkpoints stay the same. Blocks with
    BatchNorm are left alone by `selective` and refused by `blocks`: recomputing them would update the
    running statistics twice."""
    if not hasattr(model, "blocks"):
        raise PixformerError(f"{type(model).__name__} has no .blocks to checkpoint")
    n = checkpoint_count(blocks, len(model.blocks))
    sac = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)}
    for i, block in enumerate(model.blocks):
        block.__dict__.pop("forward", None)  # undo an earlier wrap
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())
        if i < n and has_bn:
            raise PixformerError(f"cannot checkpoint the blocks of {type(model).__name__}: their BatchNorm "
                                 "statistics would be updated twice")
        if i < n or (selective and not has_bn):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False,
                                              **({} if i < n else sac))
            block.checkpoint_mode = "full" if i < n else "selective"
    return model


def checkpointed_blocks(model: nn.Module) -> dict[str, int]:
    """How many blocks of `model` apply_activation_checkpointing wrapped, by mode."""
    modes = [b.checkpoint_mode for b in getattr(model, "blocks", []) if "forward" in vars(b)]
    return {"full": modes.count("full"), "selective": modes.count("selective")}


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile each transformer block (identical blocks share one compiled graph) and leave
    the rest eager; in place, so parameter names stay the same. The first steps are slow while it
    compiles (on CPU, inductor writes and builds C++)."""
    for block in getattr(model, "blocks", [model]):
        block.compile(backend=backend)
    return model


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes in bf16 natively: CUDA GPUs with bf16, CPUs with AMX or AVX512-BF16.
    Elsewhere bf16 is emulated through fp32 and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32.
    'auto' is bf16 where the hardware has it natively, else fp32; fp16 is never used on CPU."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise PixformerError("fp16 autocast is not used on CPU; use --precision bf16 or fp32")
        raise PixformerError("fp16 needs loss scaling, which pixformer does not do; use --precision bf16")
    if precision != "auto":
        raise PixformerError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if native_bf16(device) else None


def keep_freed_memory() -> bool:
    """Make glibc malloc serve large tensors from its heap and keep freed memory for reuse.

    By default glibc maps every allocation over 32 MiB (a batch of PiT activations) fresh from the
    kernel and unmaps it when freed, so each step page-faults its whole working set again: ~10% of a
    CPU training step on the 2-core machine of benchmarks/. The cost is a higher resident size, as
    freed memory stays with the process. Process-wide; returns False (and does nothing) off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
