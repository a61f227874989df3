"""Ulysses sequence parallelism with torch.distributed all-to-all (no third-party transport).

Implements ``pixelwizard_core.models.parallel.SequenceParallel``: tokens are split across ranks, and
around self-attention an all-to-all trades the token split for a head split, so each rank attends over
every token for ``heads / world_size`` heads.

Each exchange is one ``all_to_all_single`` over one buffer whose leading axis ``p`` is the peer rank: the
layouts on either side are the named rearranges below (``*_send`` before, ``*_received`` after), so the
same functions can be checked without a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange


def tokens_to_heads_send(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """[B, L/P, N, D] -> [P, B, L/P, N/P, D]: head group p goes to rank p."""
    return rearrange(x, "b l (p n) d -> p b l n d", p=world_size).contiguous()


def tokens_to_heads_received(x: torch.Tensor) -> torch.Tensor:
    """[P, B, L/P, N/P, D] from every rank p -> [B, L, N/P, D]: rank p's tokens come p-th."""
    return rearrange(x, "p b l n d -> b (p l) n d")


def heads_to_tokens_send(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """[B, L, N/P, D] -> [P, B, L/P, N/P, D]: token chunk p goes back to rank p."""
    return rearrange(x, "b (p l) n d -> p b l n d", p=world_size).contiguous()


def heads_to_tokens_received(x: torch.Tensor) -> torch.Tensor:
    """[P, B, L/P, N/P, D] from every rank p -> [B, L/P, N, D]: rank p's heads come p-th."""
    return rearrange(x, "p b l n d -> b l (p n) d")


class UlyssesGroup:
    """The ranks of one sequence-parallel group (default: the whole world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _exchange(self, send: torch.Tensor) -> torch.Tensor:
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received

    def tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        return tokens_to_heads_received(self._exchange(tokens_to_heads_send(x, self.world_size)))

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return heads_to_tokens_received(self._exchange(heads_to_tokens_send(x, self.world_size)))

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)
