"""Speed and memory switches, applied to a built model from outside it (torchtitan style).

    model = create_model("pit-t", img_size=32)
    apply_activation_checkpointing(model, "all")   # or the first N blocks; selective=True for the rest
    apply_compile(model)                           # torch.compile, block by block
    apply_onednn_linear(model)                     # fp32 linear layers on CPU through oneDNN
    apply_lean_mlp(model)                          # the MLP keeps its hidden activation once
    apply_lean_norms(model)                        # the norms' outputs recomputed in backward, not kept
    apply_depthwise_grad(model)                    # depthwise convolutions' weight and bias gradients, compiled
    set_allocator("keep")                          # glibc malloc policy for large tensors
    apply_speed_settings(model, Speed(...))        # all of train's switches in one call
    dtype = autocast_dtype("auto", device)         # bf16 where the hardware has it natively

Neither the model file nor its state_dict changes: checkpoints written with these switches on load
into a plain model.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..errors import PixformerError
from ..models import blocks_of
from ..models.attention import check_backend, set_attention_backend
from ..progress import notice


# ---- fp32 linear layers on oneDNN ---------------------------------------------------------------
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_pays() -> bool:
    """Whether fp32 linear layers run faster through oneDNN than through torch's default (MKL) here:
    on AMD CPUs with AVX-512, where MKL runs its AVX2 code and oneDNN its AVX-512 code (an AMD EPYC:
    ~12 % of a PiT-T 32x32 fp32 step). On an Intel Xeon with AMX torch's default GEMM was the faster
    (benchmarks/results/linear_backend.json: PiT-T 16x16 fp32 3.11 vs 3.28 s a step; the demo's 4-layer
    64-wide ViT at batch 16 11.6 vs 15.0 ms, the custom op's dispatch costing more than its GEMMs), so
    elsewhere it stays off."""
    try:
        info = open("/proc/cpuinfo").read(1 << 16)
    except OSError:
        return False
    return onednn_available() and "AuthenticAMD" in info and " avx512f" in info


@torch.library.custom_op("pixformer::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through oneDNN (bias added inside the GEMM). On CPUs whose MKL build takes a narrower
    code path (MKL runs AVX2 code on AMD CPUs), oneDNN's fp32 GEMM is up to twice as fast."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _onednn_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dy2 = dy.reshape(-1, dy.shape[-1])                                          # (L, out)
    dx = onednn_linear(dy, weight.t().contiguous(), None) if ctx.needs_input_grad[0] else None  # (..., in)
    dw = dy2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None  # (out, in); BLAS
    db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


onednn_linear.register_autograd(_onednn_linear_grad, setup_context=_onednn_linear_setup)


def _linear_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return onednn_linear(x, layer.weight, layer.bias)
    return F.linear(x, layer.weight, layer.bias)


def apply_onednn_linear(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the model's nn.Linear layers through oneDNN when they compute in fp32 on CPU (under bf16
    autocast, on GPUs and in other dtypes they run as before). In place; parameter names stay the same.
    The backward computes dX with oneDNN and dW with BLAS (faster for that transposed product)."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            layer.__dict__.pop("forward", None)
            if enabled and onednn_available():
                layer.forward = functools.partial(_linear_forward, layer)
    return model


# ---- the MLP's hidden activation kept once ------------------------------------------------------
# Written here because autograd keeps both fc2's input GELU(u) and GELU's input u: nearly half of what
# a ViT block keeps. Recomputing GELU(u) in the backward costs one elementwise op; torch's selective
# checkpointing does the same but runs the whole block's forward through a dispatch mode again.
@torch.library.custom_op("pixformer::gelu_linear", mutates_args=())
def gelu_linear(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """F.linear(GELU(u), weight, bias) in u's dtype (under autocast fc1's output is bf16, and the weights
    are cast to it as autocast casts them); `onednn`: an fp32 CPU GEMM through oneDNN (onednn_pays).
    Its backward recomputes GELU(u) rather than keeping it."""
    a = F.gelu(u)
    w, b = weight.to(u.dtype), None if bias is None else bias.to(u.dtype)
    with torch.autocast(u.device.type, enabled=False):
        if onednn and u.device.type == "cpu" and u.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
        return F.linear(a, w, b)


@gelu_linear.register_fake
def _(u, weight, bias, onednn):
    return u.new_empty(*u.shape[:-1], weight.shape[0])


def _gelu_linear_setup(ctx, inputs, output):
    u, weight, bias, ctx.onednn = inputs
    ctx.save_for_backward(u, weight)
    ctx.has_bias = bias is not None


def _gelu_linear_grad(ctx, dy):
    u, weight = ctx.saved_tensors
    dy2 = dy.reshape(-1, dy.shape[-1])                                          # (L, out)
    a = F.gelu(u)                                                               # (..., hidden), recomputed
    dw = (dy2.t() @ a.reshape(-1, a.shape[-1])).to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = dy2.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    del a
    w = weight.to(u.dtype)
    onednn = ctx.onednn and u.device.type == "cpu" and u.dtype == torch.float32
    da = onednn_linear(dy, w.t().contiguous(), None) if onednn else dy @ w     # (..., hidden)
    du = torch.ops.aten.gelu_backward(da, u) if ctx.needs_input_grad[0] else None
    return du, dw, db, None


gelu_linear.register_autograd(_gelu_linear_grad, setup_context=_gelu_linear_setup)


def _lean_mlp_forward(mlp: nn.Sequential, onednn: bool, x: torch.Tensor) -> torch.Tensor:
    fc1, _, fc2 = mlp
    return gelu_linear(fc1(x), fc2.weight, fc2.bias, onednn)                    # (..., out)


def lean_mlps(model: nn.Module) -> list[nn.Sequential]:
    """The blocks' MLPs that apply_lean_mlp can run: Linear, exact GELU, Linear."""
    return [b.mlp for b in blocks_of(model) if isinstance(getattr(b, "mlp", None), nn.Sequential)
            and len(b.mlp) == 3 and isinstance(b.mlp[0], nn.Linear) and isinstance(b.mlp[2], nn.Linear)
            and isinstance(b.mlp[1], nn.GELU) and b.mlp[1].approximate == "none"]


def apply_lean_mlp(model: nn.Module, enabled: bool = True, onednn: bool = False) -> nn.Module:
    """Each block's MLP keeps its hidden activation once (GELU recomputed in the backward, fc2 as
    gelu_linear): what a ViT block keeps falls by 22 % in bf16 and 25 % in fp32 (plan.vit_block_bytes).
    In place; parameter names stay the same; `onednn` as apply_onednn_linear's (fc1 keeps whatever that
    set)."""
    for mlp in lean_mlps(model):
        mlp.__dict__.pop("forward", None)
        if enabled:
            mlp.forward = functools.partial(_lean_mlp_forward, mlp, onednn and onednn_available())
    return model


# ---- norms keep only their input -----------------------------------------------------------------
# Written here because the linear layer after each of a block's norms keeps the norm's output (or its
# half-precision copy) for its weight gradient while the norm keeps its input: two tensors of the
# block's width a token where one will do. torch's selective checkpointing can drop it too, but replays
# the whole block through a dispatch mode; this recomputes only the norm, when the backward asks for it.
_NOTING: list[dict] = []    # while a lean block runs its forward: its norms' outputs, by autograd node
#                             (and "numels": their sizes, which a saved tensor must have to be one)
_VIEWS = ("ViewBackward0", "UnsafeViewBackward0")


@dataclass(frozen=True)
class _Recompute:
    """A saved tensor autograd did not keep: norm(*args) again, cast to `dtype`, viewed as it was."""
    norm: nn.Module
    args: tuple
    versions: tuple
    autocast: dict
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple
    offset: int


def _note_norm_output(table_stack: list, norm: nn.Module, args: tuple, out: torch.Tensor) -> None:
    if table_stack and torch.is_grad_enabled() and out.grad_fn is not None and out.is_contiguous() \
            and out.storage_offset() == 0 and out.untyped_storage().nbytes() == out.nbytes:
        kind = out.device.type
        table_stack[-1]["numels"].add(out.numel())
        table_stack[-1][out.grad_fn] = (norm, args, out.numel(),
                                        dict(device_type=kind, dtype=torch.get_autocast_dtype(kind),
                                             enabled=torch.is_autocast_enabled(kind)))


def _pack(table: dict, t: torch.Tensor):
    """A recipe instead of `t` where `t` is a noted norm's output, or a view of it or of its one cast copy
    (what an autocast linear layer keeps), owning the whole of a fresh storage; else `t` itself."""
    if t.numel() not in table["numels"]:                                        # most saved tensors: at once
        return t
    node, casts = t.grad_fn, 0
    while node is not None and node not in table:
        name = type(node).__name__
        casts += name == "ToCopyBackward0"
        if (name not in _VIEWS and name != "ToCopyBackward0") or casts > 1 or not node.next_functions:
            return t
        node = node.next_functions[0][0]
    if node is None:
        return t
    norm, args, numel, autocast = table[node]
    if t.untyped_storage().nbytes() != numel * t.element_size():
        return t
    return _Recompute(norm, args, tuple(a._version for a in args if isinstance(a, torch.Tensor)), autocast,
                      t.dtype, t.shape, t.stride(), t.storage_offset())


def _unpack(saved):
    if not isinstance(saved, _Recompute):
        return saved
    if tuple(a._version for a in saved.args if isinstance(a, torch.Tensor)) != saved.versions:
        raise RuntimeError("a norm's input was modified in place after the forward; its output cannot be recomputed")
    with torch.no_grad(), torch.autocast(**saved.autocast):
        out = saved.norm.forward(*saved.args)                                   # forward hooks not run again
    return out.to(saved.dtype).as_strided(saved.shape, saved.stride, saved.offset)


def _lean_norms_forward(forward, *args, **kwargs):
    """The block's forward with its norms' outputs recomputed rather than kept; as it is where nothing
    will be kept (no gradients), where inductor chooses (compiling), and inside another saved-tensor
    mechanism (activation checkpointing, offloading), which then decides for every tensor."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() \
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return forward(*args, **kwargs)
    table: dict = {"numels": set()}
    _NOTING.append(table)
    try:
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, table), _unpack):
            return forward(*args, **kwargs)
    finally:
        _NOTING.pop()


def lean_norm_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks whose two norms apply_lean_norms can recompute (Transformer blocks: norm1, norm2)."""
    return [b for b in blocks_of(model) if all(isinstance(getattr(b, n, None), nn.Module) for n in ("norm1", "norm2"))]


def apply_lean_norms(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Each block keeps its norms' inputs only: the linear layer after a norm gets the norm's output
    recomputed in the backward (one norm more per norm) instead of autograd keeping it, so what a ViT
    block keeps falls by two tensors of its width a token (plan.vit_block_bytes); the same values and
    gradients, bit for bit. Blocks checkpointed by apply_activation_checkpointing (apply that first) are
    left as they are: checkpointing decides what they keep. In place; parameter names stay the same."""
    for block in lean_norm_blocks(model):
        for norm in (block.norm1, block.norm2):
            handle = norm.__dict__.pop("_lean_handle", None)
            if handle is not None:
                handle.remove()
        wrapped = vars(block).get("forward")
        if isinstance(wrapped, functools.partial) and wrapped.func is _lean_norms_forward:
            del block.forward
        if enabled and "forward" not in vars(block):            # not checkpointed
            for norm in (block.norm1, block.norm2):
                norm._lean_handle = norm.register_forward_hook(functools.partial(_note_norm_output, _NOTING))
            block.forward = functools.partial(_lean_norms_forward, block.forward)
    return model


# ---- depthwise convolutions' weight and bias gradients -----------------------------------------
# Written here because oneDNN's depthwise weight gradient on CPU is slow: with a compiled
# shift-multiply-sum over the k*k taps instead, a ConvMixer-256/8 step (batch 512, bf16) takes 3.14 s,
# not 4.95 (benchmarks/recipe_step.py, AMD EPYC (AVX512-BF16), 2 threads).
def _taps_times_grad(xp: torch.Tensor, dy: torch.Tensor, k: int) -> torch.Tensor:
    """dW[c, 0, i, j] = sum over n, h, w of xp[n, c, h + i, w + j] * dy[n, c, h, w] in fp32, xp the input
    zero-padded by k // 2 (padded outside: inductor's kernel with the padding inside was far slower), and
    the bias gradient, the sum of dy over n, h, w, in the same pass: (C, k*k + 1)."""
    h, w = dy.shape[-2:]
    taps = [(xp[:, :, i:i + h, j:j + w] * dy).sum((0, 2, 3), dtype=torch.float32)
            for i in range(k) for j in range(k)]                                # k*k of (C,)
    return torch.stack([*taps, dy.sum((0, 2, 3), dtype=torch.float32)], 1)      # (C, k*k + 1)


_PARAM_GRADS: list = []                     # the compiled kernel, or None where inductor cannot build one
_CHUNK_BYTES = 2 << 20                      # the kernel reads its input once per tap: chunks that stay in cache


def depthwise_param_grads(x: torch.Tensor, dy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias gradients, (C, 1, k, k) and (C,) in fp32, of a stride-1, 'same'-padded k x k
    depthwise convolution, through torch.compile (inductor builds one C++ kernel per input shape); where
    it cannot compile (no C++ compiler), oneDNN's own after a one-line notice. (The bias gradient rides
    along: torch's own sum of dy over three of its four dimensions is a slow pass of its own on CPU.)"""
    C = x.shape[1]
    if not _PARAM_GRADS:
        _PARAM_GRADS.append(torch.compile(_taps_times_grad, dynamic=False))
    if _PARAM_GRADS[0] is not None:
        try:
            p = k // 2
            n = max(1, _CHUNK_BYTES // (x[0].numel() * x.element_size()))       # images a chunk: in cache
            g = sum(_PARAM_GRADS[0](F.pad(a, (p, p, p, p, 0, 0, 0, n - len(a))),  # zero images fill the
                                    F.pad(b, (0, 0, 0, 0, 0, 0, 0, n - len(b))), k)   # last chunk: one
                    for a, b in zip(x.split(n), dy.split(n)))                   # shape, one compile (C, k*k + 1)
            return g[:, :-1].reshape(C, 1, k, k), g[:, -1]
        except Exception as e:                                                  # noqa: BLE001 (any build failure)
            _PARAM_GRADS[0] = None
            notice(f"pixformer: the compiled depthwise gradient failed ({type(e).__name__}); "
                   "oneDNN's runs instead", once=True)
    p = k // 2
    _, dw, db = torch.ops.aten.convolution_backward(dy, x, x.new_empty(C, 1, k, k), [C], [1, 1], [p, p], [1, 1],
                                                    False, [0, 0], C, [False, True, True])
    return dw.float(), db.float()


@torch.library.custom_op("pixformer::depthwise_conv2d", mutates_args=())
def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A stride-1 depthwise convolution with an odd square kernel and 'same' zero padding, all in x's
    dtype; the same values as F.conv2d, with the weight and bias gradients from depthwise_param_grads."""
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])


@depthwise_conv2d.register_fake
def _(x, weight, bias):
    return torch.empty_like(x)


def _depthwise_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _depthwise_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    C, k = weight.shape[0], weight.shape[-1]
    dx = torch.ops.aten.convolution_backward(dy, x, weight, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], C,
                                             [True, False, False])[0] if ctx.needs_input_grad[0] else None
    dw = db = None
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        dw, db = depthwise_param_grads(x, dy, k)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = db.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


depthwise_conv2d.register_autograd(_depthwise_grad, setup_context=_depthwise_setup)


def _depthwise_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.ndim != 4:                                   # GPUs' own kernels are fine
        return conv._conv_forward(x, conv.weight, conv.bias)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    bias = None if conv.bias is None else conv.bias.to(dtype)
    with torch.autocast("cpu", enabled=False):                                  # cast as autocast casts a conv
        return depthwise_conv2d(x.to(dtype), conv.weight.to(dtype), bias)      # (B, C, H, W)


def depthwise_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The convolutions apply_depthwise_grad can run: depthwise, stride 1, odd square kernel, 'same' zero
    padding (ConvMixer's spatial mixing)."""
    def fits(m: nn.Conv2d) -> bool:
        k = m.kernel_size[0]
        return (m.groups == m.in_channels == m.out_channels and m.kernel_size == (k, k) and k % 2 == 1
                and m.stride == (1, 1) and m.dilation == (1, 1) and m.padding_mode == "zeros"
                and m.padding in ("same", (k // 2, k // 2)))
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and fits(m)]


def apply_depthwise_grad(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the model's depthwise convolutions (depthwise_convs) as depthwise_conv2d on CPU: the same
    forward, weight and bias gradients computed by a compiled kernel instead of oneDNN's (ConvMixer-256/8's
    step 1.6x faster at batch 512). In place; parameter names stay the same."""
    for conv in depthwise_convs(model):
        conv.__dict__.pop("forward", None)
        if enabled:
            conv.forward = functools.partial(_depthwise_forward, conv)
    return model


def checkpoint_count(blocks: int | str | None, depth: int) -> int:
    """How many blocks `blocks` ("all", "none", an int, or its string) means in a model of `depth`."""
    if blocks is None or blocks is False or (isinstance(blocks, str) and blocks.strip().lower() in ("none", "0", "")):
        return 0
    if isinstance(blocks, str) and blocks.strip().lower() == "all":
        return depth
    try:
        n = int(blocks)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise PixformerError(f"checkpoint blocks must be 'all' or a number of blocks >= 0, got {blocks!r}")
    if n > depth:
        raise PixformerError(f"cannot checkpoint {n} blocks: the model has {depth}")
    return n


# Selective checkpointing keeps the outputs of these (the matmuls and attention) and recomputes the
# cheap elementwise ops between them (norms, GELU, residual adds) in the backward pass.
_aten = torch.ops.aten
_KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
         _aten._scaled_dot_product_flash_attention_for_cpu.default,
         _aten._scaled_dot_product_flash_attention.default,
         _aten._scaled_dot_product_efficient_attention.default,
         _aten._scaled_dot_product_cudnn_attention.default, torch.ops.pixformer.blocked_attention.default,
         torch.ops.pixformer.onednn_linear.default, torch.ops.pixformer.gelu_linear.default}


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
    running statistics twice. Blocks are found by type (models.blocks_of), in forward order."""
    found = blocks_of(model)
    if not found and (blocks not in (0, None, "0", "none") or selective):
        raise PixformerError(f"{type(model).__name__} has no Transformer or mixer blocks to checkpoint")
    n = checkpoint_count(blocks, len(found))
    sac = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)}
    for i, block in enumerate(found):
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
    modes = [b.checkpoint_mode for b in blocks_of(model)
             if getattr(vars(b).get("forward"), "func", None) is checkpoint]
    return {"full": modes.count("full"), "selective": modes.count("selective")}


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile each transformer block (identical blocks share one compiled graph) and leave
    the rest eager; in place, so parameter names stay the same. The first steps are slow while it
    compiles (on CPU, inductor writes and builds C++)."""
    for block in blocks_of(model) or [model]:
        block.compile(backend=backend)
    return model


@dataclass
class Speed:
    """The speed and memory switches of a run (`train --attn-backend ...`); none changes what is computed
    beyond float rounding, and none is stored in the weights."""
    attn_backend: str = "auto"          # the attention kernel (models/attention.py); auto: chosen by device and shape
    checkpoint_blocks: int | str = 0    # full activation checkpointing of the first N blocks, or "all"
    selective_checkpoint: bool | None = None  # other blocks recompute norms / GELU in backward: -30% activation
    #                                     memory; unset: on when the step's activations exceed 1 GiB on a CPU, half
    #                                     the memory of a GPU (plan.selective_above)
    compile: bool = False               # torch.compile each block (the first steps compile)
    onednn_linear: bool | None = None   # fp32 linear layers on CPU through oneDNN; unset: where it pays
    #                                     (AMD CPUs with AVX-512, onednn_pays)
    lean_mlp: bool = True               # the MLP keeps its hidden activation once (GELU recomputed in
    #                                     backward): a ViT block keeps 22-25 % less (off under compile and
    #                                     selective checkpointing, which recompute GELU themselves)
    lean_norms: bool = False            # the linear layer after each norm recomputes the norm's output in
    #                                     backward instead of keeping it: a ViT block keeps two tensors of
    #                                     its width a token less, for two norms more (no effect under
    #                                     compile and checkpointing)
    depthwise_grad: bool = True         # depthwise convolutions (ConvMixer) take their weight gradient on CPU
    #                                     from a compiled kernel, not oneDNN's (ConvMixer-256/8: 1.6x a step;
    #                                     off under compile)
    allocator: str = "auto"             # auto | keep | release | system: glibc malloc policy (set_allocator)

    @property
    def lean_mlp_on(self) -> bool:
        """Whether the lean MLP runs: asked for, and not compiled (inductor picks what to recompute)."""
        return self.lean_mlp and not self.compile

    @property
    def lean_norms_on(self) -> bool:
        """Whether the blocks recompute their norms' outputs: asked for, and not compiled."""
        return self.lean_norms and not self.compile

    def check(self) -> "Speed":
        """Refuse an unknown attention backend or allocator policy, or checkpoint blocks that are not a
        count (train checks before loading data; a count beyond the model's depth when it is built)."""
        check_backend(self.attn_backend)
        check_allocator(self.allocator)
        checkpoint_count(self.checkpoint_blocks, 1 << 62)
        return self


def apply_speed_settings(model: nn.Module, speed: Speed | None = None, **settings) -> nn.Module:
    """Everything `train` applies to a built model for speed and memory: a Speed, or its fields as
    keywords (an unset selective_checkpoint means off here; train decides it with plan.selective_pays).
    benchmarks/train_step.py uses it too, so what it measures is what train runs."""
    speed = (speed or Speed(**settings)).check()
    set_attention_backend(model, speed.attn_backend)
    apply_activation_checkpointing(model, speed.checkpoint_blocks, bool(speed.selective_checkpoint))
    onednn = onednn_pays() if speed.onednn_linear is None else speed.onednn_linear
    apply_onednn_linear(model, onednn)
    apply_lean_mlp(model, speed.lean_mlp_on and not speed.selective_checkpoint, onednn)  # selective recomputes GELU too
    apply_lean_norms(model, speed.lean_norms_on)        # after checkpointing: checkpointed blocks are left alone
    apply_depthwise_grad(model, speed.depthwise_grad and not speed.compile)
    if speed.compile:
        apply_compile(model)
    set_allocator(speed.allocator, memory_first=checkpointed_blocks(model)["full"] > 0)
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


def cpu_name() -> str:
    """This machine's CPU as figures name it: its model name and its bf16 matmul instructions, e.g.
    'AMD EPYC (AVX512-BF16)' or 'Intel Xeon Platinum 8480+ (AMX, AVX512-BF16)', or where it has none its
    widest vector instructions, 'AMD EPYC (AVX2)' (from /proc/cpuinfo)."""
    try:
        info = open("/proc/cpuinfo").read(1 << 16)
    except OSError:
        return platform.processor() or platform.machine()
    lines = info.splitlines()
    name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.machine())
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    isa = [n for f, n in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if f in flags] \
        or [n for f, n in (("avx512f", "AVX512"), ("avx2", "AVX2")) if f in flags][:1]
    return f"{name} ({', '.join(isa)})" if isa else name


def autocast_dtype(precision: str, device: torch.device | str, quiet: bool = False) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32.
    'auto' is bf16 where the hardware has it natively, else fp32; fp16 is never used on CPU. bf16 where
    the device emulates it prints a one-line notice, unless `quiet` (an estimate, which runs nothing)."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not native_bf16(device) and not quiet:
            where = f"this CPU ({cpu_name()}) has no native bf16 (AVX512-BF16 or AMX)" if device.type == "cpu" \
                else f"this {device.type} device has no native bf16"
            notice(f"--precision bf16: {where}, so bf16 products are emulated, many times slower than fp32; "
                   "--precision auto trains in fp32 here", once=True)
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise PixformerError("fp16 autocast is not used on CPU; use --precision bf16 or fp32")
        raise PixformerError("fp16 needs loss scaling, which pixformer does not do; use --precision bf16")
    if precision != "auto":
        raise PixformerError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if native_bf16(device) else None


ALLOCATOR_POLICIES = ("auto", "keep", "release", "system")


def check_allocator(policy: str) -> str:
    if policy not in ALLOCATOR_POLICIES:
        raise PixformerError(f"allocator policy must be one of {ALLOCATOR_POLICIES}, got {policy!r}")
    return policy


def set_allocator(policy: str, memory_first: bool = False) -> bool:
    """How glibc's malloc serves the large tensors of a CPU training step (process-wide).

    keep     from the heap, and freed memory stays there for reuse: after the first step nothing is
             page-faulted again (benchmarks/results/switches*: PiT-T 32x32 fp32 steps 9-10 % faster than
             under glibc's own policy, bf16 within noise); the resident size stays at the heap's
             high-water mark, which fragmentation puts above the live tensors (1.3-3.5x measured)
    release  every block over 1 MiB is mapped fresh and unmapped when freed: the resident size follows
             the live tensors, and every step page-faults its working set again (~1.6x step time)
    system   leave malloc as it is (glibc's own policy lies between the two)
    auto     keep, or system when `memory_first` (train: when blocks are checkpointed in full)
    Returns whether a policy was applied: False for system, and off glibc, where nothing is changed."""
    if check_allocator(policy) == "auto":
        policy = "system" if memory_first else "keep"
    if policy == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mmap_above, trim_above = ((1 << 30, (1 << 31) - 1) if policy == "keep" else (1 << 20, 1 << 20))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_above)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_above))
