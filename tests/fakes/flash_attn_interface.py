"""A stand-in for flash-attn 3 (``flash_attn_interface``, built from the flash-attention repo's hopper/
folder) on the CPU: the real signature of ``flash_attn_func`` and the same input checks as the flash-attn
2 fake (tests/fakes/flash_attn.py), results from SDPA in float32.

It returns ``(out, softmax_lse)`` as FA3 builds from before ``return_attn_probs`` did, so the tuple path
of the library is exercised.
"""

from __future__ import annotations

import torch

from fakes.flash_attn import check_inputs, sdpa_forward

calls: list[dict] = []


@torch.library.custom_op("fake_flash_attn_3::fwd", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    check_inputs(q, k, v, "FlashAttention-3")
    calls.append({"dtype": q.dtype, "q": tuple(q.shape), "k": tuple(k.shape)})
    return sdpa_forward(q, k, v, softmax_scale)


@_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def flash_attn_func(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    if causal or qv is not None or window_size != (-1, -1) or softcap:
        raise NotImplementedError("the fake flash-attn 3 implements plain attention only")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    out = _forward(q, k, v, softmax_scale)
    lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    return out, lse
