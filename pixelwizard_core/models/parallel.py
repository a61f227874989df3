"""What the DiT needs from sequence parallelism, independent of how the collectives are done.

The DiT splits its tokens across ranks; self-attention swaps the split from tokens to heads and back
(Ulysses); the head output is gathered. ``pixelwizard_core.distributed`` implements this protocol with
torch.distributed; the model only calls it.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..errors import ConfigError


class SequenceParallel(Protocol):
    """Collectives over the ranks of one sequence-parallel group."""

    rank: int
    world_size: int

    def tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L/P, N, D] local tokens, all heads -> [B, L, N/P, D] all tokens, local heads."""

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, N/P, D] -> [B, L/P, N, D]: the inverse of tokens_to_heads."""

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L/P, C] on every rank -> [B, L, C] on every rank."""


def padded_length(length: int, world_size: int) -> int:
    """Token count padded up to a multiple of the world size."""
    return math.ceil(length / world_size) * world_size


def local_slice(length: int, sp: SequenceParallel) -> slice:
    """The rows of a (padded) sequence of ``length`` tokens that rank ``sp.rank`` owns."""
    local = padded_length(length, sp.world_size) // sp.world_size
    return slice(sp.rank * local, (sp.rank + 1) * local)


def shard_tokens(x: torch.Tensor, sp: SequenceParallel, pad_value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 of ``x`` to a multiple of the world size and keep this rank's rows."""
    length = x.shape[1]
    pad = padded_length(length, sp.world_size) - length
    if pad:
        filler = x.new_full((x.shape[0], pad, *x.shape[2:]), pad_value)
        x = torch.cat([x, filler], dim=1)
    return x[:, local_slice(length, sp)]


def valid_degrees(num_heads: int) -> list[int]:
    """Sequence-parallel degrees that split ``num_heads`` evenly (1, 2, 3, 4, 6, 8, 12, 24 for Wan)."""
    return [d for d in range(1, num_heads + 1) if num_heads % d == 0]


def check_degree(num_heads: int, world_size: int) -> None:
    """Refuse a degree that does not divide the heads, naming the ones that do."""
    if num_heads % world_size:
        raise ConfigError(
            f"sequence-parallel degree {world_size} does not divide the model's {num_heads} attention heads; "
            f"use one of {', '.join(map(str, valid_degrees(num_heads)))} GPUs/processes"
        )
