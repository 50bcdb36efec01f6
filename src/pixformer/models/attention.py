"""One attention function with interchangeable backends.

Every model calls `attention(q, k, v, spec)`; which kernel runs is a property of the call site
(`backend=`), set from outside the model with `set_attention_backend(model, name)`.

    q: (B, H, Nq, Dh), k, v: (B, H, Nk, Dh)  ->  out: (B, H, Nq, Dh)

Nk may differ from Nq: the keys can be another sequence (a shard's queries against gathered keys).
What may attend to what is an `AttnSpec`, not only a dense mask:
- `mask`: boolean (True = attend) or additive, broadcastable to (B, H, Nq, Nk);
- `segment_ids` (B, Nq) and `kv_segment_ids` (B, Nk): a query attends only to keys of its own
  segment (several images packed into one sequence). Padding is a segment of its own: give padding
  tokens an id no image has (e.g. -1) and no image token ever attends to them. A query that may attend
  to no key at all gets zeros, on every backend (as the fused kernels give);
- `group`: a process group the keys are sharded over (sequence parallelism, engine/sequence.py):
  each rank holds its shard of queries, keys and values; `attention` all-gathers the keys and values
  of the group's ranks (in rank order, autograd-aware: the backward reduce-scatters their gradients)
  and the backend attends this rank's queries over them. `mask` and `kv_segment_ids` then describe
  the gathered keys. Backends that need self-attention ("varlen") or one fused kernel are refused.
  With `regather`, the gathered keys and values are not kept for the backward: the gather and the
  attention run again there (activation checkpointing of this one step), so a layer keeps only its
  own shard's, for one more all-gather per layer.

Backends
- "sdpa": torch.nn.functional.scaled_dot_product_attention; torch picks the kernel. Never
  materialises the N x N matrix when a fused kernel is available for the inputs (on CPU: flash,
  O(N) memory). What "auto" runs in fp32 and on GPUs. There is no attention dropout: it would
  force the math kernel on CPU.
- "math": explicit softmax(QK^T / sqrt(Dh)) V. Materialises N x N; it is the test oracle and the
  path that can return attention probabilities for analysis.
- "blocked": exact softmax attention computed block by block with batched matmuls, at most
  BLOCK_ELEMENTS scores at a time (so O(N) memory like flash, never the N x N matrix of the whole
  batch); its backward recomputes each block's probabilities. On CPUs with native bf16 it runs
  bf16 attention faster than torch's CPU flash kernel, which computes in fp32 inside: about twice as
  fast on an AMD EPYC (AVX512-BF16); on an Intel Xeon (AMX) 1.4x at 1,025 tokens and level at 4,097,
  where for full attention its forward is that flash kernel's and only the backward runs in blocks
  (`_flash_forward`). More than 1,024 keys are padded to a multiple of 32 (KEY_ALIGN). Scores are
  rounded to the input dtype before the softmax, as in "math" (on AMX with full attention, in the
  backward only).
- "varlen": each contiguous run of one segment id (a packed image) attends over itself only (what
  FlashAttention's variable-length kernel and FlexAttention's document mask do on GPUs), so a pack
  costs the sum of its images' N_i^2, not L^2. Images of close lengths share one batched call, each
  padded to the longest of its group with those keys masked, where a call of its own would cost more
  than the padding (`group_lengths`); each group goes through "math", "blocked" or "sdpa" as "auto"
  would pick for it. Padding (negative ids) gets zeros, not attention among padding. Needs
  self-attention with contiguous segments; otherwise it runs "blocked".
- "flex": torch's FlexAttention with a block mask made from the segment ids (and a boolean mask):
  blocks where no query shares a segment with a key are skipped, so packed images cost what they
  would alone, and padding (negative ids) attends to nothing (zeros, as in "varlen"), so a row of
  padding costs no attention. Compiled on GPUs, once, with dynamic shapes; on CPU torch runs it
  forward only (eager), so there a call that needs gradients falls back to "blocked" with a one-line
  notice.
- "auto" (the default): with segment ids (packed images), "varlen" on CPU and "flex" on GPUs, so
  packing never forms a dense (L x L) mask and skips the scores between images. Otherwise, for bf16 / fp16 on CPU "math" while a
  layer's scores are few (AUTO_MATH_SCORES: B*H*N*N <= 16 Mi, 32 MiB in bf16; faster there, and
  bounded), "blocked" beyond; "sdpa" everywhere else (fp32 on CPU, where the flash kernel is the
  faster; GPUs).
- "flash", "efficient", "cudnn": SDPA restricted to one fused kernel. On CPU only "flash" exists;
  a kernel the device (or these inputs) cannot run falls back to "sdpa" with a one-line notice,
  printed once.

"math" and "sdpa" turn segment ids into a (B, 1, Nq, Nk) boolean mask; "blocked" builds the mask of
each block from the ids and never forms the mask of the whole sequence. New backends register
with `register_backend`.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..errors import PixformerError
from ..progress import notice


def _restrict(mask: Tensor | None, same: Tensor) -> Tensor:
    """`mask` (boolean or additive) further restricted to the pairs where `same` is True."""
    if mask is None:
        return same
    return mask & same if mask.dtype == torch.bool else mask.masked_fill(~same, float("-inf"))


@dataclass(frozen=True)
class AttnSpec:
    """What may attend to what (see the module doc). The default spec is full attention."""
    mask: Tensor | None = None             # bool (True = attend) or additive, broadcastable to (B, H, Nq, Nk)
    segment_ids: Tensor | None = None      # (B, Nq) integer segment of each query
    kv_segment_ids: Tensor | None = None   # (B, Nk) segment of each key; default: segment_ids
    group: Any = None                      # process group the keys are sharded over (gathered here)
    regather: bool = False                 # with group: gather again in the backward instead of keeping
    cache: dict = field(default_factory=dict, compare=False, repr=False)   # what a backend derives once
    #                                        per spec and reuses in every layer (flex's block mask)

    def __post_init__(self):
        if self.kv_segment_ids is not None and self.segment_ids is None:
            raise PixformerError("AttnSpec: kv_segment_ids need the queries' segment_ids too (a key's segment "
                                 "means nothing without the queries')")

    def key_segments(self) -> Tensor | None:
        return self.segment_ids if self.kv_segment_ids is None else self.kv_segment_ids

    def dense_mask(self) -> Tensor | None:
        """`mask` combined with the segment mask, as one tensor broadcastable to (B, H, Nq, Nk)."""
        if self.segment_ids is None:
            return self.mask
        same = self.segment_ids[:, None, :, None] == self.key_segments()[:, None, None, :]  # (B, 1, Nq, Nk)
        return _restrict(self.mask, same)

# A backend takes (q, k, v, spec, need_weights) and returns (out, probs_or_None).
Backend = Callable[[Tensor, Tensor, Tensor, AttnSpec, bool], tuple[Tensor, Tensor | None]]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str):
    def wrap(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn
    return wrap


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


@register_backend("sdpa")
def _sdpa(q, k, v, spec, need_weights):
    if need_weights:  # fused kernels never form the probabilities; use the explicit path
        return _math(q, k, v, spec, True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=spec.dense_mask()), None


@register_backend("math")
def _math(q, k, v, spec, need_weights):
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, Nq, Nk); scaling q is N x Dh work
    mask, dead = spec.dense_mask(), None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)
        dead = _dead_rows(mask)
    if dead is not None:                   # they get zeros, as the fused kernels give them, and finite gradients
        scores = scores.masked_fill(dead, 0.0)
    probs = scores.softmax(dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    return probs @ v, (probs if need_weights else None)


def _dead_rows(mask: Tensor) -> Tensor | None:
    """Where a boolean or additive `mask` leaves a query no key at all, (..., Nq, 1), or None where it leaves
    none (read off the mask, which is smaller than the scores): those queries get zeros."""
    dead = (~mask if mask.dtype == torch.bool else torch.isneginf(mask)).all(-1, keepdim=True)
    return dead if dead.any() else None


# ---- blocked attention ------------------------------------------------------------------------
BLOCK_ELEMENTS = 1 << 22   # scores per block: 4 Mi (8 MiB in bf16), the fastest on the CPUs measured


def _even(n: int, most: int) -> int:
    """The size of the parts when n things are cut into as few parts of at most `most` as possible, as
    equal as they can be (4 heads with room for 3 a block: 2 + 2, not 3 + 1)."""
    parts = -(-n // max(most, 1))
    return -(-n // parts)


def _blocks(B: int, H: int, Nq: int, Nk: int):
    """Index blocks (images, heads, query rows) covering (B, H, Nq) with at most BLOCK_ELEMENTS
    scores each, cut evenly: whole images when they fit, else heads of one image, else query rows of
    one head."""
    if H * Nq * Nk <= BLOCK_ELEMENTS:
        g = _even(B, BLOCK_ELEMENTS // (H * Nq * Nk))
        return [(slice(b, b + g), slice(None), slice(None)) for b in range(0, B, g)]
    if Nq * Nk <= BLOCK_ELEMENTS:
        g = _even(H, BLOCK_ELEMENTS // (Nq * Nk))
        return [(slice(b, b + 1), slice(h, h + g), slice(None)) for b in range(B) for h in range(0, H, g)]
    rows = _even(Nq, BLOCK_ELEMENTS // Nk)
    return [(slice(b, b + 1), slice(h, h + 1), slice(r, r + rows))
            for b in range(B) for h in range(H) for r in range(0, Nq, rows)]


# Keys padded to a multiple of KEY_ALIGN (zero keys and values, their scores -inf) when there are more
# than KEY_ALIGN_ABOVE: forward and backward took 0-11 % less time at 1,025 to 2,049 keys (bf16, heads 32
# wide, Intel Xeon (AMX), two threads; benchmarks/attention.py --pad-above), and padding 257, 513 or 769
# keys made it slower or no faster.
KEY_ALIGN, KEY_ALIGN_ABOVE = 32, 1024


def _aligned(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k, v (B, H, Nk, D) contiguous, with zero keys appended up to a multiple of KEY_ALIGN when Nk is
    above KEY_ALIGN_ABOVE (the blocks then mask the added keys)."""
    pad = (-k.shape[2]) % KEY_ALIGN if k.shape[2] > KEY_ALIGN_ABOVE else 0
    if not pad:
        return k.contiguous(), v.contiguous()
    return F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))


def _block_probs(q: Tensor, k: Tensor, mask: Tensor | None, keys: int) -> Tensor:
    """softmax(q k^T + mask) of one block over its first `keys` keys: q (G, n, D) already scaled,
    k (G, Nk, D) with Nk >= keys (the rest padding); mask (G, n, keys)."""
    s = torch.bmm(q, k.transpose(1, 2))                                     # (G, n, Nk)
    if s.shape[-1] > keys:
        s[..., keys:].fill_(float("-inf"))                                  # the padding keys
    if mask is not None:
        real = s[..., :keys]                                                # (G, n, keys) view
        if mask.dtype == torch.bool:
            real.masked_fill_(~mask, float("-inf"))
        else:
            real.add_(mask)
        p = torch.softmax(s, dim=-1)
        dead = p[..., :1].isnan()                # a query with no key: all NaN (no other row has one); zeros, as
        return p.masked_fill_(dead, 0.0) if dead.any() else p            # "math" (one column read, not the mask)
    return torch.softmax(s, dim=-1)


def _block_mask(mask: Tensor | None, q_seg: Tensor | None, k_seg: Tensor | None, block, shape) -> Tensor | None:
    """The mask of one block as (G, n, Nk), from a mask broadcastable to (B, H, Nq, Nk) and the
    segment ids of the queries (B, Nq) and keys (B, Nk); only this block's rows are ever formed."""
    imgs, heads, rows = block
    m = None
    if mask is not None:
        m = mask.expand(shape)[block]                                       # (b, h, n, Nk)
    if q_seg is not None:
        same = q_seg[imgs, rows][:, None, :, None] == k_seg[imgs][:, None, None, :]  # (b, 1, n, Nk)
        same = same.expand(-1, len(range(*heads.indices(shape[1]))), -1, -1)
        m = _restrict(m, same)
    return None if m is None else m.reshape(-1, *m.shape[2:])


@functools.cache
def _amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_seg: Tensor | None) -> bool:
    """Whether the blocked op's forward runs torch's CPU flash kernel instead of its blocks: full attention
    (no mask, no segments) in bf16 on a CPU with AMX, over inputs that kernel takes as they are (one
    head width, rows of contiguous features, some keys). There (Intel Xeon (AMX), two threads, bf16;
    benchmarks/attention.py --no-flash-forward) the flash kernel's forward took 0.54-0.56x the blocks'
    time at 1,024 and 1,025 tokens (0.85x at 257) and its backward 1.25-2.5x theirs, heads 32 and 64
    wide; so the backward stays blocked."""
    return (mask is None and q_seg is None and q.device.type == "cpu" and q.dtype == torch.bfloat16 and _amx()
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and k.shape[2] > 0
            and all(t.stride(-1) == 1 for t in (q, k, v)))


@torch.library.custom_op("pixformer::blocked_attention", mutates_args=())
def blocked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_seg: Tensor | None,
                      k_seg: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v in blocks; q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv);
    with segment ids q_seg (B, Nq) and k_seg (B, Nk), a query sees only keys of its own segment."""
    if _flash_forward(q, k, v, mask, q_seg):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0].contiguous()
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    qs = torch.mul(q, 1.0 / math.sqrt(D), out=q.new_empty(q.shape))        # contiguous, scaled
    k, v = _aligned(k, v)                                                   # (B, H, Nk', D), Nk' >= Nk
    out = q.new_empty(B, H, Nq, v.shape[-1])
    for imgs, heads, rows in _blocks(B, H, Nq, k.shape[2]):
        qb = qs[imgs, heads, rows].flatten(0, 1)                            # (G, n, D)
        kb, vb = k[imgs, heads].flatten(0, 1), v[imgs, heads].flatten(0, 1)  # (G, Nk', D)
        p = _block_probs(qb, kb, _block_mask(mask, q_seg, k_seg, (imgs, heads, rows), (B, H, Nq, Nk)), Nk)  # (G, n, Nk')
        torch.bmm(p, vb, out=out[imgs, heads, rows].flatten(0, 1))          # (G, n, Dv)
    return out


@blocked_attention.register_fake
def _(q, k, v, mask, q_seg, k_seg):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _bmm_into(a: Tensor, b: Tensor, dst: Tensor, add: bool) -> None:
    """dst = a @ b, or dst += a @ b where blocks of query rows add up; dst a view of the gradient."""
    if add:
        dst.add_(torch.bmm(a, b))
    else:
        torch.bmm(a, b, out=dst)


@torch.library.custom_op("pixformer::blocked_attention_backward", mutates_args=())
def blocked_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                               q_seg: Tensor | None, k_seg: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of blocked_attention; each block's probabilities are recomputed (nothing N x N is kept).
    dK and dV add up over query-row blocks, in fp32 (at least) when a head's rows are split."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = 1.0 / math.sqrt(D)
    qs = torch.mul(q, scale, out=q.new_empty(q.shape))
    (k, v), dout = _aligned(k, v), dout.contiguous()                        # (B, H, Nk', D)
    blocks = _blocks(B, H, Nq, k.shape[2])
    split = blocks[0][2].stop is not None and blocks[0][2].stop < Nq
    acc = torch.promote_types(q.dtype, torch.float32) if split else q.dtype
    dq = q.new_empty(q.shape)
    dk, dv = (t.new_zeros(t.shape, dtype=acc) if split else t.new_empty(t.shape) for t in (k, v))
    for imgs, heads, rows in blocks:
        qb, dob = qs[imgs, heads, rows].flatten(0, 1), dout[imgs, heads, rows].flatten(0, 1)
        kb, vb = k[imgs, heads].flatten(0, 1), v[imgs, heads].flatten(0, 1)
        p = _block_probs(qb, kb, _block_mask(mask, q_seg, k_seg, (imgs, heads, rows), (B, H, Nq, Nk)), Nk)
        _bmm_into(p.transpose(1, 2), dob, dv[imgs, heads].flatten(0, 1), split)
        ds = torch._softmax_backward_data(torch.bmm(dob, vb.transpose(1, 2)), p, -1, p.dtype)
        torch.bmm(ds, kb, out=dq[imgs, heads, rows].flatten(0, 1)).mul_(scale)
        _bmm_into(ds.transpose(1, 2), qb, dk[imgs, heads].flatten(0, 1), split)
    return dq, dk[:, :, :Nk].to(k.dtype).contiguous(), dv[:, :, :Nk].to(v.dtype).contiguous()


@blocked_attention_backward.register_fake
def _(dout, q, k, v, mask, q_seg, k_seg):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _blocked_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _blocked_grad(ctx, dout):
    q, k, v, mask, q_seg, k_seg = ctx.saved_tensors
    return *blocked_attention_backward(dout, q, k, v, mask, q_seg, k_seg), None, None, None


blocked_attention.register_autograd(_blocked_grad, setup_context=_blocked_setup)


@register_backend("blocked")
def _blocked(q, k, v, spec, need_weights):
    if need_weights:
        return _math(q, k, v, spec, True)
    mask = spec.mask
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        raise PixformerError("the 'blocked' attention backend does not differentiate an additive mask; "
                             "use 'math' or 'sdpa' for a learned mask")
    q_seg = spec.segment_ids
    return blocked_attention(q, k, v, mask, q_seg, None if q_seg is None else spec.key_segments()), None


# ---- variable-length runs ------------------------------------------------------------------------
def segment_runs(segments: Tensor) -> list[tuple[int, int, int, int]] | None:
    """(row, start, end, id) of each maximal run of one id in (B, N) segment ids, or None when some id
    occurs in more than one run (its tokens are not contiguous)."""
    B, N = segments.shape
    start = torch.ones(B, N, dtype=torch.bool, device=segments.device)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    rows, cols = start.nonzero(as_tuple=True)
    rows, cols, ids = rows.tolist(), cols.tolist(), segments[start].tolist()
    ends = [cols[i + 1] if i + 1 < len(cols) and rows[i + 1] == rows[i] else N for i in range(len(cols))]
    seen = [(r, i) for r, i in zip(rows, ids) if i >= 0]
    if len(set(seen)) != len(seen):
        return None
    return list(zip(rows, cols, ends, ids))


# Grouping images of different lengths: a call costs about VARLEN_CALL_SCORES attention scores of work
# (its dispatch, mask and copies, forward and backward) on top of its scores; images of close lengths share
# a call, each padded to the group's longest (its padding keys masked), where that costs less than a call
# of its own. Measured on benchmarks/packing.py's images, AMD EPYC (AVX512-BF16), two threads: 2^16 and
# 2^18 alike, 2^14 and 0 (a call per distinct length) about a third slower.
VARLEN_CALL_SCORES = 1 << 16


@dataclass(frozen=True)
class VarlenPlan:
    """How "varlen" attends to packed images: `groups` of (images, length, key mask or None), each one
    batched call over its images padded to `length`; `gather` (S,) the flat (row * N + column) position
    of every slot of the groups in order (padding slots repeat a real one, their keys masked); `scatter`
    (B * N,) each position's slot in the groups' output, S (a zero row) for padding. Both None when the
    groups are the packs as they lie (images of one length, shortest first, no padding)."""
    groups: list[tuple[int, int, Tensor | None]]
    gather: Tensor | None
    scatter: Tensor | None


def group_lengths(lengths: list[int], heads: int) -> list[list[int]]:
    """Indices of `lengths` in groups of close lengths, shortest first: the partition of the sorted
    lengths into runs that minimises the cost of attending to each run as one call padded to its
    longest (VARLEN_CALL_SCORES a call, plus heads * images * longest^2 scores), found by dynamic
    programming over the distinct lengths."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    distinct = sorted(set(lengths))
    counts = [lengths.count(n) for n in distinct]
    best, cut = [0.0] + [math.inf] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        images = 0
        for i in range(j - 1, -1, -1):                     # the last group: distinct lengths i .. j-1
            images += counts[i]
            cost = best[i] + VARLEN_CALL_SCORES + heads * images * distinct[j - 1] ** 2
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(distinct)
    while j:
        bounds.append(distinct[j - 1])
        j = cut[j]
    groups, at = [], 0
    for top in reversed(bounds):                           # shortest group first
        end = at
        while end < len(order) and lengths[order[end]] <= top:
            end += 1
        groups.append(order[at:end])
        at = end
    return groups


def varlen_plan(runs: list[tuple[int, int, int, int]], B: int, N: int, heads: int, device) -> VarlenPlan:
    """The `VarlenPlan` of `segment_runs` output over (B, N) segment ids for `heads` heads."""
    images = [(b * N + s, e - s) for b, s, e, seg in runs if seg >= 0]
    gather, scatter, groups = [], torch.full((B * N,), -1, dtype=torch.long), []
    for members in group_lengths([n for _, n in images], heads):
        length = max(images[i][1] for i in members)
        lens = torch.tensor([images[i][1] for i in members])
        for i in members:
            at, n = images[i]
            scatter[at: at + n] = torch.arange(len(gather), len(gather) + n)
            gather.extend(range(at, at + n))
            gather.extend([at] * (length - n))                                   # padding: masked keys
        mask = None if bool((lens == length).all()) else (torch.arange(length) < lens[:, None])[:, None, None]
        groups.append((len(members), length, None if mask is None else mask.to(device)))
    if gather == list(range(B * N)):                   # the groups are the sequence as it is: no gathers
        return VarlenPlan(groups, None, None)
    scatter[scatter < 0] = len(gather)
    return VarlenPlan(groups, torch.tensor(gather, dtype=torch.long, device=device), scatter.to(device))


@register_backend("varlen")
def _varlen(q, k, v, spec, need_weights):
    if need_weights or spec.segment_ids is None:
        return _BACKENDS["math" if need_weights else "auto"](q, k, v, spec, need_weights)
    B, H, N, _ = q.shape
    key = ("varlen", spec.segment_ids.shape, H)
    if key not in spec.cache:
        self_attn = spec.kv_segment_ids is None or spec.kv_segment_ids is spec.segment_ids
        runs = segment_runs(spec.segment_ids) if self_attn and spec.mask is None and N == k.shape[2] else None
        spec.cache[key] = None if runs is None else varlen_plan(runs, B, N, H, q.device)
    plan = spec.cache[key]
    if plan is None:
        return _blocked(q, k, v, spec, need_weights)
    # every image's tokens in one gather per tensor (none where the groups are the packs as they lie),
    # token-major (S, H * Dh): rows of contiguous features, views of q, k, v as the model makes them; then
    # one batched call per group of images of close lengths (the masks additive: nothing to undo in the
    # backward) and one gather back, straight into the (B, N, H, Dv) layout the model merges the heads
    # from. The backward is an index_add and a cat.
    q, k, v = (t.transpose(1, 2).reshape(B * N, -1) for t in (q, k, v))               # (B * N, H * Dh) views
    if plan.gather is not None:
        q, k, v = (t.index_select(0, plan.gather) for t in (q, k, v))              # (S, H * Dh)
    Dv = v.shape[-1] // H
    sizes = [n * length for n, length, _ in plan.groups]
    outs = []
    for (n, length, mask), qg, kg, vg in zip(plan.groups, q.split(sizes), k.split(sizes), v.split(sizes)):
        qg, kg, vg = (t.view(n, length, H, -1).transpose(1, 2) for t in (qg, kg, vg))   # (n, H, length, Dh)
        inner = auto_backend(qg.device.type, qg.dtype, H * n * length ** 2)
        bias = None if mask is None else qg.new_zeros(mask.shape).masked_fill_(~mask, float("-inf"))  # (n, 1, 1, length)
        out = _BACKENDS[inner](qg, kg, vg, AttnSpec(mask=bias), False)[0]           # (n, H, length, Dv)
        outs.append(out.transpose(1, 2).reshape(n * length, H * Dv))
    if plan.scatter is None:
        out = torch.cat(outs) if len(outs) > 1 else outs[0]                       # (B * N, H * Dv)
    else:
        outs.append(v.new_zeros(1, H * Dv))                                        # what padding gets
        out = torch.cat(outs).index_select(0, plan.scatter)                       # (B * N, H * Dv)
    return out.view(B, N, H, Dv).transpose(1, 2), None                            # (B, H, N, Dv)


# ---- FlexAttention --------------------------------------------------------------------------------
_FLEX: dict[tuple[str, str], Callable] = {}
# torch's notice that uncompiled (CPU) flex_attention is a reference implementation: the one warning hidden
_FLEX_EAGER_WARNING = "flex_attention called without torch.compile"


def _flex_fn(name: str, device_type: str) -> Callable:
    """torch's `flex_attention` or `create_block_mask` (`name`), compiled once on GPUs (uncompiled,
    flex_attention is a slow reference); as it is on CPU. Dynamic shapes: a few graphs serve every
    pack shape of training and evaluation, where static ones compile per (shape, grad mode) and past
    dynamo's recompile limit (8) fall back to the unfused reference, with only a log line."""
    if (name, device_type) not in _FLEX:
        import torch.nn.attention.flex_attention as fa
        fn = getattr(fa, name)
        _FLEX[name, device_type] = torch.compile(fn, dynamic=True) if device_type == "cuda" else fn
    return _FLEX[name, device_type]


def _flex_block_mask(q: Tensor, k: Tensor, spec: AttnSpec):
    """The block mask of `spec` (segment ids and a boolean mask) for these shapes, made once per spec.
    A padding query (negative id) attends to nothing and gets zeros, as in "varlen": the blocks of a
    row of padding are all skipped."""
    key = ("flex", q.shape[0], q.shape[2], k.shape[2], q.device)
    if key not in spec.cache:
        q_seg, k_seg = spec.segment_ids, spec.key_segments()
        m = spec.mask
        m = None if m is None else m.reshape((1,) * (4 - m.ndim) + tuple(m.shape))   # (B or 1, H or 1, Nq or 1, Nk)
        dense = None if m is None else m.expand(q.shape[0], m.shape[1], q.shape[2], k.shape[2])
        heads = None if dense is None or dense.shape[1] == 1 else dense.shape[1]

        def mask_mod(b, h, i, j):
            if q_seg is None:
                ok = torch.ones((), dtype=torch.bool, device=q.device)
            else:
                ok = (q_seg[b, i] == k_seg[b, j]) & (q_seg[b, i] >= 0)
            return ok if dense is None else ok & dense[b, 0 if heads is None else h, i, j]
        spec.cache[key] = _flex_fn("create_block_mask", q.device.type)(mask_mod, q.shape[0], heads, q.shape[2],
                                                                       k.shape[2], device=q.device)
    return spec.cache[key]


@register_backend("flex")
def _flex(q, k, v, spec, need_weights):
    if need_weights:
        return _math(q, k, v, spec, True)
    if spec.mask is not None and spec.mask.dtype != torch.bool:
        notice("pixformer: attention backend 'flex' takes segment ids and boolean masks only; an additive mask "
               "runs on 'sdpa'", once=True)
        return _sdpa(q, k, v, spec, need_weights)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        notice("pixformer: FlexAttention has no backward on CPU; attention that needs gradients runs on 'blocked'",
               once=True)
        return _blocked(q, k, v, spec, need_weights)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FLEX_EAGER_WARNING)
        if spec.segment_ids is None and spec.mask is None:
            return _flex_fn("flex_attention", q.device.type)(q, k, v), None
        return _flex_fn("flex_attention", q.device.type)(q, k, v, block_mask=_flex_block_mask(q, k, spec)), None


AUTO_MATH_SCORES = 1 << 24


def auto_backend(device_type: str, dtype: torch.dtype, scores: int, segments: bool = False) -> str:
    """The backend "auto" runs for a layer of `scores` = B*H*Nq*Nk attention scores (see the module doc),
    `segments`: whether the spec has segment ids (packed images)."""
    if segments:
        return "varlen" if device_type == "cpu" else "flex"
    if device_type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    return "math" if scores <= AUTO_MATH_SCORES else "blocked"


@register_backend("auto")
def _auto(q, k, v, spec, need_weights):
    name = auto_backend(q.device.type, q.dtype, q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2],
                        spec.segment_ids is not None)
    return _BACKENDS[name](q, k, v, spec, need_weights)


# Fused SDPA kernels as explicit choices. A (backend, device, dtype, mask?) that failed once is
# remembered, so the fallback costs one failed call per run.
_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}
_UNAVAILABLE: set[tuple] = set()


def kernel_available(name: str, device: torch.device | str) -> bool:
    """Whether the fused kernel `name` ("flash", "efficient", "cudnn") exists on `device` at all
    (particular inputs may still be refused: then the call falls back)."""
    device = torch.device(device)
    if device.type == "cpu":
        return name == "flash"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if name == "flash":
        return torch.backends.cuda.is_flash_attention_available()
    if name == "cudnn":
        return torch.backends.cudnn.is_available()
    return True


KERNEL_REFUSALS = r"(Memory efficient kernel|Flash attention|CuDNN attention|Torch was not compiled|.*kernel not used)"


def _kernel_backend(name: str) -> Backend:
    def run(q, k, v, spec, need_weights):
        mask = spec.dense_mask()
        key = (name, q.device.type, q.dtype, mask is not None)
        if need_weights or key in _UNAVAILABLE:
            return _sdpa(q, k, v, spec, need_weights)
        if not kernel_available(name, q.device):
            reason = f"not available on {q.device.type}"
        else:
            try:
                with sdpa_kernel(_KERNELS[name]), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=UserWarning,   # torch's many-line reasons for a refusal,
                                            message=KERNEL_REFUSALS)          # said here in one line instead
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
            except RuntimeError:
                reason = f"refused these inputs ({q.device.type}, {str(q.dtype)[6:]}, " \
                         f"{'with' if mask is not None else 'no'} mask)"
        _UNAVAILABLE.add(key)
        notice(f"pixformer: attention kernel {name!r} {reason}; falling back to 'sdpa'", once=True)
        return _sdpa(q, k, v, spec, need_weights)
    return run


for _name in _KERNELS:
    register_backend(_name)(_kernel_backend(_name))


def check_backend(backend: str) -> str:
    """`backend`, or a clear error naming the backends there are."""
    if backend not in _BACKENDS:
        raise PixformerError(f"unknown attention backend {backend!r}; choose from {available_backends()}")
    return backend


SEQUENCE_PARALLEL_BACKENDS = ("auto", "sdpa", "math", "blocked", "flex")


def check_sequence_backend(backend: str) -> str:
    """`backend`, or a clear error if it cannot attend over keys gathered from a sequence's shards."""
    if backend not in SEQUENCE_PARALLEL_BACKENDS:
        raise PixformerError(f"attention backend {backend!r} cannot attend over keys gathered from a sequence's "
                             f"shards (sequence parallelism); use one of {list(SEQUENCE_PARALLEL_BACKENDS)}")
    return backend


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on its gradient contiguous."""
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _all_gather_autograd(t: Tensor, group) -> Tensor:
    """torch's all-gather along dim 0 whose backward reduce-scatters: all_gather_single_autograd from
    torch 2.13; before it, all_gather_tensor_autograd, whose backward refuses a non-contiguous gradient."""
    import torch.distributed._functional_collectives as fc
    if hasattr(fc, "all_gather_single_autograd"):
        return fc.all_gather_single_autograd(t, 0, group)
    return _ContiguousGrad.apply(fc.all_gather_tensor_autograd(t, 0, group))


def gather_keys(k: Tensor, v: Tensor, group) -> tuple[Tensor, Tensor]:
    """Keys and values (B, H, S, Dh) of every rank of `group`, concatenated in rank order along the
    sequence: (B, H, P*S, Dh) each, in one collective whose backward reduce-scatters the gradients."""
    import torch.distributed as dist
    if dist.get_world_size(group) == 1:
        return k, v
    kv = torch.stack([k, v]).permute(3, 0, 1, 2, 4).contiguous()           # (S, 2, B, H, Dh): torch gathers dim 0
    kv = _all_gather_autograd(kv, group)                                    # (P*S, 2, B, H, Dh)
    k, v = kv.permute(1, 2, 3, 0, 4).unbind(0)                              # (B, H, P*S, Dh) each
    return k, v


def attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec | Tensor | None = None, *,
              backend: str = "auto", need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention of q (B, H, Nq, Dh) over k, v (B, H, Nk, Dh) under `spec` (an
    AttnSpec; a plain tensor is taken as its mask). Returns (out, probs), probs None unless `need_weights`."""
    if spec is None or isinstance(spec, Tensor):
        spec = AttnSpec(mask=spec)
    if spec.group is not None:
        check_sequence_backend(backend)
        if spec.regather and not need_weights and torch.is_grad_enabled():
            return checkpoint(_over_gathered, q, k, v, spec, backend, use_reentrant=False), None
        k, v = gather_keys(k, v, spec.group)
    if spec.segment_ids is not None and spec.key_segments().shape[-1] != k.shape[2]:
        raise PixformerError(f"segment ids for {spec.key_segments().shape[-1]} keys given with {k.shape[2]} keys")
    return _BACKENDS[check_backend(backend)](q, k, v, spec, need_weights)


def _over_gathered(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, backend: str) -> Tensor:
    """This rank's queries over the keys and values gathered from the shards of `spec.group` (what
    `regather` runs again in the backward)."""
    return _BACKENDS[backend](q, *gather_keys(k, v, spec.group), spec, False)[0]


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Route every attention layer of `model` through `backend` (applied from outside the model)."""
    check_backend(backend)
    for m in model.modules():
        if hasattr(m, "attn_backend"):
            m.attn_backend = backend
    return model


class record_attention:
    """Context manager that collects attention probabilities of every layer.

        with record_attention(model) as maps:
            model(images)
        maps  # list of (B, H, N, N) tensors, one per layer, in forward order
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if hasattr(m, "attn_backend")]
        self.maps: list[Tensor] = []

    def __enter__(self) -> list[Tensor]:
        for m in self.layers:
            m.record_to = self.maps
        return self.maps

    def __exit__(self, *exc):
        for m in self.layers:
            m.record_to = None
