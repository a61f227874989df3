"""A stand-in for flash-attn 2.8.3 (the ``flash_attn`` package) that runs on the CPU.

What is real: the Python signature of ``flash_attn_func``; its structure (an autograd Function around a
``torch.library`` custom op, so dynamo sees one opaque op as it does the real one); and the input checks of
its C++ ``mha_fwd`` with their messages (compute capability >= 8.0 read from the current device, fp16/bf16
only, q/k/v of one dtype and device, contiguous last dimension, head dim <= 256, heads divisible by the
key/value heads, k/v shapes). Results come from SDPA in float32, rounded once to the input dtype (flash
accumulates in float32). Tests put this module in ``sys.modules["flash_attn"]`` (``tests/fake_cuda.py``);
the CPU stands for the GPU, so the device check is that q, k and v share one device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__version__ = "2.8.3"
HALF = (torch.float16, torch.bfloat16)
calls: list[dict] = []  # every kernel run: dtype, shapes (tests read it)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)  # what TORCH_CHECK raises


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: str) -> None:
    """The checks of flash-attn's C++ forward, in its order."""
    major, _minor = torch.cuda.get_device_capability()
    check(major >= 8, f"{arch} only supports Ampere GPUs or newer.")
    check(q.dtype in HALF, f"{arch} only support fp16 and bf16 data type")
    check(k.dtype == q.dtype, "query and key must have the same dtype")
    check(v.dtype == q.dtype, "query and value must have the same dtype")
    check(q.device == k.device == v.device, "Input tensor must be on CUDA device")
    for t in (q, k, v):
        check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    check(q.dim() == 4, "q must have shape (batch_size, seqlen_q, num_heads, head_size)")
    batch, _, heads, head_size = q.shape
    check(batch > 0, "batch size must be positive")
    check(head_size <= 256, f"{arch} forward only supports head dimension at most 256")
    check(heads % k.shape[2] == 0, "Number of heads in key/value must divide number of heads in query")
    check(tuple(k.shape) == (batch, k.shape[1], k.shape[2], head_size), "k has the wrong shape")
    check(tuple(v.shape) == tuple(k.shape), "v has the wrong shape")


def sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Softmax attention in float32, [B, L, H, D] in and out, rounded once to q's dtype."""
    groups = q.shape[2] // k.shape[2]
    q32, k32, v32 = (t.float().transpose(1, 2) for t in (q, k, v))
    k32, v32 = (t.repeat_interleave(groups, dim=1) for t in (k32, v32))
    out = F.scaled_dot_product_attention(q32, k32, v32, scale=softmax_scale)
    return out.transpose(1, 2).to(q.dtype).contiguous()


@torch.library.custom_op("fake_flash_attn::fwd", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    check_inputs(q, k, v, "FlashAttention")
    calls.append({"dtype": q.dtype, "q": tuple(q.shape), "k": tuple(k.shape)})
    return sdpa_forward(q, k, v, softmax_scale)


@_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    return torch.empty_like(q)


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale):  # noqa: ANN001, ANN205 - autograd's protocol
        return _forward(q, k, v, softmax_scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        raise NotImplementedError("the fake flash-attn has no backward")


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q: (batch_size, seqlen, nheads, headdim); k, v: (batch_size, seqlen, nheads_k, headdim).
    Returns out (batch_size, seqlen, nheads, headdim); (out, softmax_lse, S_dmask) with return_attn_probs."""
    if dropout_p or causal or window_size != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("the fake flash-attn implements plain attention only")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    out = FlashAttnFunc.apply(q, k, v, softmax_scale)
    return (out, None, None) if return_attn_probs else out
