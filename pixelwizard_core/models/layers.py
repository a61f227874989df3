"""Small layers shared by the DiT and its HR variant.

The official pipeline runs the DiT under bf16 autocast with fp32 autocast islands (time embedding,
modulation, head). We do not rely on autocast: each layer states the precision it computes in, which
gives the same numbers with bf16 parameters and works on every device.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Linear(nn.Linear):
    """Linear that computes in its weight dtype: what bf16 autocast did around the official blocks.

    Weights stored in fp8 (see :func:`store_linears_in_fp8`) are scaled back and computed in bf16."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.weight.dtype == FP8 else self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == FP8:
            weight = self.weight.to(torch.bfloat16) * self.weight_scale
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), weight, bias)
        return super().forward(x.to(self.weight.dtype))


@torch.no_grad()
def store_linears_in_fp8(module: nn.Module) -> int:
    """Store every :class:`Linear` weight under ``module`` as float8_e4m3fn with a per-tensor scale
    (max |w| maps to 448), halving their memory against bf16; returns how many were converted."""
    converted = 0
    for layer in module.modules():
        if type(layer) is Linear and layer.weight.dtype != FP8:
            scale = layer.weight.abs().max().float().clamp_min(1e-12) / FP8_MAX
            layer.weight = nn.Parameter((layer.weight.float() / scale).to(FP8), requires_grad=False)
            layer.register_buffer("weight_scale", scale.to(torch.bfloat16), persistent=False)
            converted += 1
    return converted


class FP32Linear(nn.Linear):
    """Linear that always computes in float32: the official fp32 autocast regions (time, dt, head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class Conv3d(nn.Conv3d):
    """Conv3d that computes in its weight dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class RMSNorm(nn.Module):
    """Wan RMSNorm: normalise in float32, round back to the input dtype, then scale by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """Wan LayerNorm: computed in float32 (weights too), result in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 with a float32 result (what autocast does with group_norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[cos | sin] features of ``position`` ([N]) with frequencies 10000^(-k/half), in float64.

    Only ever called on one value per sample (never per token), so float64 costs nothing.
    """
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def mlp(in_dim: int, dim: int, activation: nn.Module, linear: type[nn.Linear] = Linear) -> nn.Sequential:
    """Linear -> activation -> Linear, with the official key layout ``.0`` / ``.2``."""
    return nn.Sequential(linear(in_dim, dim), activation, linear(dim, dim))
