"""LoRA updates that run beside a weight instead of being merged into it.

A weight stored in float8 (:func:`.layers.store_linears_in_fp8`) or quantized cannot take a LoRA update:
rounding W + delta back to 3 mantissa bits would lose most of a typical delta, and merging would need the
unquantized weight to restore. Such a layer computes ``layer(x) + x @ down.T @ up.T (+ x @ diff.T)``
instead: the low-rank factors cost what the LoRA file costs, and removing them restores the layer exactly.

The layer's class is swapped for a subclass that adds the delta (and swapped back on removal) rather than
hooked: torch.compile'd blocks skip module hooks added after they compiled but recompile when a class
changes. The delta module is a plain attribute of the layer, not a child: a block's tensors (streamed by
block swap as one buffer) stay as they were; whoever attaches it keeps it where the model's weights move.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

DELTA_ATTRIBUTE = "_pixelwizard_lora_delta"


class LowRankDelta(nn.Module):
    """x -> x @ down.T @ up.T (+ x @ diff.T), computed in ``dtype``; ``up`` already holds the scales."""

    def __init__(self, down: torch.Tensor | None, up: torch.Tensor | None, diff: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        for name, tensor in (("down", down), ("up", up), ("diff", diff)):
            self.register_buffer(name, None if tensor is None else tensor.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = (self.down if self.down is not None else self.diff).dtype
        x = x.to(dtype)
        out = None if self.down is None else F.linear(F.linear(x, self.down), self.up)
        if self.diff is not None:
            full = F.linear(x, self.diff)
            out = full if out is None else out + full
        return out


class _WithDelta:
    """Mixed in before a layer's own class: its output plus the attached delta's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.__dict__[DELTA_ATTRIBUTE](x).to(out.dtype)


@functools.cache
def _with_delta(cls: type) -> type:
    return type(f"LoRA{cls.__name__}", (_WithDelta, cls), {"_pixelwizard_base": cls})


def attach_delta(layer: nn.Module, delta: LowRankDelta) -> None:
    """Make ``layer`` add ``delta``'s output to its own (one delta per layer; attach again to replace)."""
    if not isinstance(layer, _WithDelta):
        layer.__class__ = _with_delta(type(layer))
    layer.__dict__[DELTA_ATTRIBUTE] = delta  # not a child module: see the module docstring


def detach_delta(layer: nn.Module) -> None:
    """Undo :func:`attach_delta`: the layer's own class again, without the delta."""
    if isinstance(layer, _WithDelta):
        layer.__class__ = layer._pixelwizard_base
        layer.__dict__.pop(DELTA_ATTRIBUTE, None)


def has_delta(layer: nn.Module) -> bool:
    return isinstance(layer, _WithDelta)
