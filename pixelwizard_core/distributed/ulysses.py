"""Ulysses sequence parallelism with torch.distributed all-to-all (no third-party transport).

Implements ``pixelwizard_core.models.parallel.SequenceParallel``: tokens are split across ranks, and
around self-attention an all-to-all trades the token split for a head split, so each rank attends over
every token for ``heads / world_size`` heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class UlyssesGroup:
    """The ranks of one sequence-parallel group (default: the whole world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        inputs = [chunk.contiguous() for chunk in x.chunk(self.world_size, dim=scatter_dim)]
        outputs = [torch.empty_like(chunk) for chunk in inputs]
        dist.all_to_all(outputs, inputs, group=self.group)
        return torch.cat(outputs, dim=gather_dim)

    def tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_to_all(x, scatter_dim=2, gather_dim=1)

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self._all_to_all(x, scatter_dim=1, gather_dim=2)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)
