"""Attention backends: flash-attn 3 / 2 and SageAttention on the CUDA GPUs that run them, torch SDPA everywhere.

Layout everywhere is [B, L, heads, head_dim], as in the official Wan code. Padded keys (sequence
parallel padding) always sit at the end, so masking them is slicing them away: exact on every backend.

A backend is resolved once per device and compute dtype into an :class:`AttentionKernel`, when a model is
placed or its backend is set (:meth:`~pixelwizard_core.models.dit.WanDiT.place_attention`): the kernel
function is looked up then (flash-attn imported, the GPU's compute capability read from that device) and
carried in the forward's state. Compiled blocks therefore never import, probe or look anything up: each
such call is a dynamo graph break (a lookup per attention call split every DiT block into 11 graphs).
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
AUTO = "auto"
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 refuses older GPUs at call time ("Ampere GPUs or newer")
HOPPER = 9  # flash-attn 3 (``flash_attn_interface``) is built for Hopper
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """One way to compute attention: ``run(q, k, v)`` in layout [B, L, heads, head_dim], and whether it
    can run on a device (``None``: yes; else the reason, shown to people).

    ``kernel(device)`` (optional) looks up the function for one device once, at placement (``run`` then
    serves one-off calls such as doctor's); ``dtypes`` are the compute dtypes it takes as they are (empty:
    any): "auto" passes over a backend that would have to cast the model's dtype."""

    run: Kernel
    unavailable: Callable[[torch.device], str | None]
    install_hint: str = ""  # what to install for it (doctor shows it)
    kernel: Callable[[torch.device], Kernel] | None = None
    dtypes: tuple[torch.dtype, ...] = ()
    # asked for by name where it cannot run: fall back to "auto" with one warning instead of refusing (an
    # optional accelerator a workflow may name on a machine that lacks it)
    falls_back: bool = False

    def kernel_for(self, device: torch.device) -> Kernel:
        return self.run if self.kernel is None else self.kernel(device)


@dataclass(frozen=True)
class AttentionKernel:
    """A backend resolved for one device and compute dtype: what the forward calls."""

    name: str  # the registered backend that runs
    run: Kernel
    device: torch.device
    dtype: torch.dtype
    requested: str = AUTO


# The registry: "auto" picks the first entry that can run on the device in the model's dtype, so order is
# preference. Adding a backend is one ``ATTENTION_BACKENDS.register`` call; the CLI, the nodes and doctor
# list it.
ATTENTION_BACKENDS: Registry[AttentionBackend] = Registry("attention backend")


def attention_choices() -> tuple[str, ...]:
    """What a user may ask for: "auto" and every registered backend."""
    return (AUTO, *ATTENTION_BACKENDS.names())


# --- devices -----------------------------------------------------------------------------------------
def indexed(device: torch.device | str) -> torch.device:
    """A device with its index (``cuda`` -> ``cuda:N`` of the current device): kernels are per device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of ``device`` itself (not of the current device), None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def _gpu_text(device: torch.device, capability: tuple[int, int]) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)}) has compute capability {capability[0]}.{capability[1]}"


def _function(module_name: str, attribute: str) -> Callable | None:
    """``module.attribute`` if the package imports (only called while resolving, never in a forward)."""
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, OSError):
        return None


# --- flash-attn -----------------------------------------------------------------------------------------
_FLASH_HINT = ("pip install flash-attn --no-build-isolation (or a prebuilt wheel matching your torch and CUDA); "
               "flash-attn 3 on Hopper from the flash-attention repo's hopper/ folder")


def _flash_choice(device: torch.device) -> tuple[str, Kernel] | str:
    """(which flash-attn, its flash_attn_func) for ``device``, or why none runs there."""
    capability = device_capability(device)
    if capability is None:
        return "it needs a CUDA GPU and the flash-attn package (pip install flash-attn, or flash-attn 3 on Hopper)"
    if capability < FLASH_MIN_CAPABILITY:
        return (f"{_gpu_text(device, capability)}; FlashAttention needs 8.0 or newer (Ampere, Ada, Hopper, "
                "Blackwell)")
    if capability[0] == HOPPER and (function := _function("flash_attn_interface", "flash_attn_func")):
        return "flash-attn 3", function
    if function := _function("flash_attn", "flash_attn_func"):
        return "flash-attn 2", function
    return "the flash-attn package is not installed (pip install flash-attn)"


def _flash_call(function: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out_dtype = q.dtype
    if q.dtype not in _HALF:  # flash kernels take half types only; the official code casts to bf16
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = function(q, k, v)
    if isinstance(out, tuple):  # flash-attn 3 builds before return_attn_probs return (out, lse)
        out = out[0]
    return out.to(out_dtype)


def _flash_kernel(device: torch.device) -> Kernel:
    return functools.partial(_flash_call, _flash_choice(device)[1])


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One-off call (doctor): looks the kernel up on every call, so never used by a model's forward."""
    return _flash_kernel(q.device)(q, k, v)


# --- SageAttention ------------------------------------------------------------------------------------------
# On Hopper sageattn's automatic choice is the fp8-PV kernel, reported to turn Wan2.2 videos into noise;
# the INT8-QK / FP16-PV CUDA kernel (what it picks on sm80) is used there when the package has it.
_SAGE_HOPPER_KERNEL = "sageattn_qk_int8_pv_fp16_cuda"


def _sage_choice(device: torch.device) -> Kernel | str:
    capability = device_capability(device)
    if capability is None:
        return "it needs a CUDA GPU and the sageattention package"
    if capability < FLASH_MIN_CAPABILITY:
        return f"{_gpu_text(device, capability)}; SageAttention 2 needs 8.0 or newer"
    if capability[0] == HOPPER and (function := _function("sageattention", _SAGE_HOPPER_KERNEL)):
        return functools.partial(function, pv_accum_dtype="fp32")
    return _function("sageattention", "sageattn") or "the sageattention package is not installed"


def _sage_call(function: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out_dtype = q.dtype
    if q.dtype not in _HALF:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    return function(q, k, v, tensor_layout="NHD", is_causal=False).to(out_dtype)


def _sage_kernel(device: torch.device) -> Kernel:
    return functools.partial(_sage_call, _sage_choice(device))


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _sage_kernel(q.device)(q, k, v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _reason(choice: object) -> str | None:
    return choice if isinstance(choice, str) else None


# Order is "auto"'s preference: flash-attn computes exact attention; SageAttention (installed, on a GPU it
# supports) quantizes Q and K to int8, 2-3x faster than SDPA on consumer cards, close to but not the
# official numerics; SDPA runs everywhere.
ATTENTION_BACKENDS.register("flash", AttentionBackend(
    _flash, lambda device: _reason(_flash_choice(device)), _FLASH_HINT, _flash_kernel, _HALF))
ATTENTION_BACKENDS.register("sage", AttentionBackend(
    _sage, lambda device: _reason(_sage_choice(device)), "pip install sageattention (SageAttention 2 needs a build "
    "matching your torch and CUDA)", _sage_kernel, _HALF, falls_back=True))
ATTENTION_BACKENDS.register("sdpa", AttentionBackend(_sdpa, lambda device: None))


# --- resolution ---------------------------------------------------------------------------------------------
_said: set[str] = set()


def _say_once(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time only: every placement resolves again, the reason does not change."""
    if message not in _said:
        _said.add(message)
        log.log(level, message)


def check_backend_name(backend: str) -> str:
    """``backend`` if it is "auto" or registered; otherwise a ConfigError naming the choices."""
    if backend != AUTO and backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}: choose one of {', '.join(attention_choices())}")
    return backend


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _refusal(entry: AttentionBackend, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why "auto" passes over ``entry`` on ``device`` for ``dtype`` compute (None: it may take it)."""
    reason = entry.unavailable(device)
    if reason is None and entry.dtypes and dtype not in entry.dtypes:
        reason = f"it computes in {' or '.join(map(_dtype_name, entry.dtypes))}, the model in {_dtype_name(dtype)}"
    return reason


def _auto(device: torch.device, dtype: torch.dtype) -> str:
    passed = []
    for name, entry in ATTENTION_BACKENDS.items():
        reason = _refusal(entry, device, dtype)
        if reason is None:
            if passed and device.type == "cuda":  # on the CPU, flash being absent is not news
                _say_once(f"attention 'auto' uses {name} on {device}: " + "; ".join(passed))
            return name
        passed.append(f"{name}: {reason}")
    raise ConfigError(f"no attention backend runs on {device}: {'; '.join(passed)}")


def _explicit(name: str, device: torch.device, dtype: torch.dtype) -> str:
    entry = ATTENTION_BACKENDS.get(name)
    reason = entry.unavailable(device)
    if reason is not None and entry.falls_back:
        fallback = _auto(device, dtype)
        _say_once(f"attention backend {name!r} cannot run on {device} ({reason}): using {fallback!r}", logging.WARNING)
        return fallback
    if reason is not None:
        raise ConfigError(f"attention backend {name!r} cannot run on {device}: {reason}; use 'auto' or 'sdpa' instead")
    if entry.dtypes and dtype not in entry.dtypes:  # the official code does this cast silently
        _say_once(f"attention backend {name!r} computes in bfloat16 while the model computes in "
                  f"{_dtype_name(dtype)} (as the official code does); use 'auto' or 'sdpa' for {_dtype_name(dtype)} "
                  "attention")
    return name


def resolve_attention(backend: str, device: torch.device | str, dtype: torch.dtype) -> AttentionKernel:
    """The kernel of ``backend`` ("auto" or a registered name) for computing in ``dtype`` on ``device``.

    "auto": the first registered backend that runs on the device and takes the dtype as it is (so float32
    means float32 SDPA; flash only on GPUs of compute capability 8.0 or newer, in bf16/fp16), saying once
    why a preferred one was passed over on a GPU. A named backend that cannot run raises ConfigError."""
    name = check_backend_name(backend)
    device = indexed(device)
    chosen = _auto(device, dtype) if name == AUTO else _explicit(name, device, dtype)
    return AttentionKernel(chosen, ATTENTION_BACKENDS.get(chosen).kernel_for(device), device, dtype, name)


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """The name of the backend that ``backend`` means on ``device`` (reports; refuses impossible choices)."""
    if torch.device(device).type == "meta":  # weights not placed yet: only the name can be checked
        return check_backend_name(backend)
    return resolve_attention(backend, device, dtype).name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_len: int | None = None,
    backend: str | AttentionKernel = AUTO,
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim); only the first ``k_len`` keys are attended.

    ``backend``: a resolved :class:`AttentionKernel` (what models pass: nothing is looked up), or a name,
    resolved on this call for q's device and dtype (one-off use)."""
    if k_len is not None and k_len < k.shape[1]:
        k, v = k[:, :k_len], v[:, :k_len]
    kernel = backend if isinstance(backend, AttentionKernel) else resolve_attention(backend, q.device, q.dtype)
    return kernel.run(q, k, v)
