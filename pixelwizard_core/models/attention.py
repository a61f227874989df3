"""Attention backends: flash-attn 3 / 2 on CUDA when installed, torch SDPA everywhere else.

Layout everywhere is [B, L, heads, head_dim], as in the official Wan code. Padded keys (sequence
parallel padding) always sit at the end, so masking them is slicing them away: exact on every backend.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

from ..errors import ConfigError

log = logging.getLogger("pixelwizard")

BACKENDS = ("auto", "sdpa", "flash")
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_function():
    """flash_attn_func of flash-attn 3 (``flash_attn_interface``) or 2 (``flash_attn``), or None."""
    for module_name in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(module_name).flash_attn_func
        except (ImportError, AttributeError, OSError):
            continue
    return None


def flash_available() -> bool:
    """True when a flash-attn package is importable and CUDA is present."""
    return torch.cuda.is_available() and _flash_function() is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into the backend that will run on ``device``; refuse impossible choices early."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if device.type == "meta":  # weights not placed yet: only the name can be checked
        return backend
    if backend == "auto":
        return "flash" if device.type == "cuda" and flash_available() else "sdpa"
    if backend == "flash" and not (device.type == "cuda" and flash_available()):
        raise ConfigError(
            "attention backend 'flash' needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn, or flash-attn 3 on Hopper); use 'auto' or 'sdpa' instead"
        )
    return backend


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out_dtype = q.dtype
    if q.dtype not in _HALF:  # flash kernels take half types only, as in the official code
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = _flash_function()(q, k, v)
    if isinstance(out, tuple):  # flash-attn 2 and some flash-attn 3 builds return (out, lse)
        out = out[0]
    return out.to(out_dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_len: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim); only the first ``k_len`` keys are attended."""
    if k_len is not None and k_len < k.shape[1]:
        k, v = k[:, :k_len], v[:, :k_len]
    if resolve_backend(backend, q.device) == "flash":
        return _flash(q, k, v)
    return _sdpa(q, k, v)
