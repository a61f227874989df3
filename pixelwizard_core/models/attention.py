"""Attention backends: flash-attn 3 / 2 on CUDA when installed, torch SDPA everywhere else.

Layout everywhere is [B, L, heads, head_dim], as in the official Wan code. Padded keys (sequence
parallel padding) always sit at the end, so masking them is slicing them away: exact on every backend.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import Registry

log = logging.getLogger("pixelwizard")

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionBackend:
    """One way to compute attention: ``run(q, k, v)`` in layout [B, L, heads, head_dim], and whether it
    can run on a device (``None``: yes; else the reason, shown to people)."""

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    unavailable: Callable[[torch.device], str | None]
    install_hint: str = ""  # what to install for it (doctor shows it)


# The registry: "auto" picks the first entry that can run on the device, so order is preference.
# Adding a backend is one ``ATTENTION_BACKENDS.register`` call; the CLI, the nodes and doctor list it.
ATTENTION_BACKENDS: Registry[AttentionBackend] = Registry("attention backend")
AUTO = "auto"


def attention_choices() -> tuple[str, ...]:
    """What a user may ask for: "auto" and every registered backend."""
    return (AUTO, *ATTENTION_BACKENDS.names())


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


def _flash_unavailable(device: torch.device) -> str | None:
    if device.type == "cuda" and flash_available():
        return None
    return ("it needs a CUDA GPU and the flash-attn package (pip install flash-attn, or flash-attn 3 on "
            "Hopper)")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into the backend that will run on ``device``; refuse impossible choices early."""
    if backend != AUTO and backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}: choose one of {', '.join(attention_choices())}")
    if device.type == "meta":  # weights not placed yet: only the name can be checked
        return backend
    if backend == AUTO:
        return next(name for name, entry in ATTENTION_BACKENDS.items() if entry.unavailable(device) is None)
    reason = ATTENTION_BACKENDS.get(backend).unavailable(device)
    if reason is not None:
        raise ConfigError(f"attention backend {backend!r} cannot run on {device.type}: {reason}; use 'auto' or "
                          "'sdpa' instead")
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


ATTENTION_BACKENDS.register("flash", AttentionBackend(
    _flash, _flash_unavailable, "pip install flash-attn --no-build-isolation (or a prebuilt wheel matching your torch "
    "and CUDA); flash-attn 3 on Hopper from the flash-attention repo's hopper/ folder"))
ATTENTION_BACKENDS.register("sdpa", AttentionBackend(_sdpa, lambda device: None))


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
    return ATTENTION_BACKENDS.get(resolve_backend(backend, q.device)).run(q, k, v)
