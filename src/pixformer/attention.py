"""One attention function with interchangeable backends.

Every model calls `attention(q, k, v)`; which kernel runs is a property of the call site
(`backend=`), set from outside the model with `set_attention_backend(model, name)`.

    q, k, v: (B, H, N, Dh)  ->  out: (B, H, N, Dh)

Backends
- "sdpa": torch.nn.functional.scaled_dot_product_attention; torch picks the kernel. Never
  materialises the N x N matrix when a fused kernel is available for the inputs (on CPU: flash,
  O(N) memory). Default. There is no attention dropout: it would force the math kernel on CPU.
- "math": explicit softmax(QK^T / sqrt(Dh)) V. Materialises N x N; it is the test oracle and the
  path that can return attention probabilities for analysis.
- "flash", "efficient", "cudnn": SDPA restricted to one fused kernel. On CPU only "flash" exists;
  a kernel the device (or these inputs) cannot run falls back to "sdpa" with a one-line notice,
  printed once.

New backends (packed / masked, sequence-parallel) register with `register_backend`.
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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


# Fused SDPA kernels as explicit choices. A (backend, device, dtype, mask?) that failed once is
# remembered, so the fallback costs one failed call per run.
_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}
_UNAVAILABLE: set[tuple] = set()
_NOTICED: set[str] = set()


def notice(message: str) -> None:
    """Print a one-line notice to stderr, once per message."""
    if message not in _NOTICED:
        _NOTICED.add(message)
        print(f"pixformer: {message}", file=sys.stderr)


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


def _kernel_backend(name: str) -> Backend:
    def run(q, k, v, mask, need_weights):
        key = (name, q.device.type, q.dtype, mask is not None)
        if need_weights or key in _UNAVAILABLE:
            return _sdpa(q, k, v, mask, need_weights)
        if not kernel_available(name, q.device):
            reason = f"not available on {q.device.type}"
        else:
            try:
                with sdpa_kernel(_KERNELS[name]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch explains the refusal over many lines
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
            except RuntimeError:
                reason = f"refused these inputs ({q.device.type}, {str(q.dtype)[6:]}, " \
                         f"{'with' if mask is not None else 'no'} mask)"
        _UNAVAILABLE.add(key)
        notice(f"attention kernel {name!r} {reason}; falling back to 'sdpa'")
        return _sdpa(q, k, v, mask, need_weights)
    return run


for _name in _KERNELS:
    register_backend(_name)(_kernel_backend(_name))


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
