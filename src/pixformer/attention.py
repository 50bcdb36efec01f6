"""One attention function with interchangeable backends.

Every model calls `attention(q, k, v)`; which kernel runs is a property of the call site
(`backend=`), set from outside the model with `set_attention_backend(model, name)`.

    q, k, v: (B, H, N, Dh)  ->  out: (B, H, N, Dh)

Backends
- "sdpa": torch.nn.functional.scaled_dot_product_attention. Never materialises the N x N matrix
  when a fused kernel (flash / memory-efficient) is available for the inputs. Default.
- "math": explicit softmax(QK^T / sqrt(Dh)) V. Materialises N x N; it is the test oracle and the
  path that can return attention probabilities for analysis.

New backends (packed / masked, sequence-parallel) register with `register_backend`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import PixformerError

# A backend takes (q, k, v, mask) and returns (out, probs_or_None).
Backend = Callable[[Tensor, Tensor, Tensor, Tensor | None, bool], tuple[Tensor, Tensor | None]]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str):
    def wrap(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn
    return wrap


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


@register_backend("sdpa")
def _sdpa(q, k, v, mask, need_weights):
    if need_weights:  # fused kernels never form the probabilities; use the explicit path
        return _math(q, k, v, mask, True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None


@register_backend("math")
def _math(q, k, v, mask, need_weights):
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, N, N)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1)
    return probs @ v, (probs if need_weights else None)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
              backend: str = "sdpa", need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention. `mask` is boolean (True = attend) or additive, broadcastable
    to (B, H, N, N). Returns (out, probs), probs is None unless `need_weights`."""
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise PixformerError(f"unknown attention backend {backend!r}; choose from {available_backends()}") from None
    return fn(q, k, v, mask, need_weights)


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Route every attention layer of `model` through `backend` (applied from outside the model)."""
    if backend not in _BACKENDS:
        raise PixformerError(f"unknown attention backend {backend!r}; choose from {available_backends()}")
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
