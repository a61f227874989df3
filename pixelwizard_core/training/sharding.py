"""Training-side FSDP (torch FSDP2 ``fully_shard``), mixed precision and activation checkpointing.

- One FSDP unit per DiT block plus the root (the rest of the backbone), as the reference wraps by block;
  the anchor injector is a unit of its own kept in float32 (the reference builds it after the bf16 cast /
  FSDP wrap so it stays float32 and unsharded).
- bf16 is FSDP mixed precision: float32 master weights and optimiser state, bf16 copies for compute,
  float32 gradient reduction. The model's own float32 islands (time/dt embeddings, norms, head) compute
  in float32 from the bf16-rounded weights, exactly as inference on a bf16 model. With one process this
  still goes through ``fully_shard`` on a one-rank group, so bf16 training has one code path.
- Activation checkpointing recomputes each block in the backward pass (non-reentrant); the blocks'
  names, and so the state-dict keys, are unchanged.

The inference-side FSDP lives in ``pixelwizard_core.distributed`` (written separately); this module only
wraps a model for training.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..system import launched_world_size

log = logging.getLogger("pixelwizard")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, *, need_group: bool) -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or make a one-rank group when
    ``need_group`` (FSDP mixed precision on one process). NCCL on CUDA, gloo on the CPU."""
    world_size = launched_world_size()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        return World(dist.get_rank(), dist.get_world_size(), local_rank)
    if need_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World()


def training_device(device: str, world: World) -> torch.device:
    """This rank's device: cuda:<local rank> under torchrun when CUDA is asked for."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
        return torch.device("cuda", world.local_rank if world.world_size > 1 else (dev.index or 0))
    return dev


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every DiT block in backward instead of keeping its activations; returns the count."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"{type(model).__name__} has no .blocks to checkpoint")
    for block in blocks:
        original = block.forward

        @functools.wraps(original)
        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def shard_model(model: nn.Module, precision: str) -> nn.Module:
    """Wrap ``model`` (float32 weights, on its training device) with FSDP2 for ``precision``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    exact = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    adapter = getattr(model, "spatial_adapter", None)
    if adapter is not None:
        fully_shard(adapter, mp_policy=exact)
        # FSDP warns because the injector's Linear output is a view; the DiT only adds it out of place
        # (tokens = tokens + control), which keeps the backward hook, so the warning does not apply.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPAnchorInjector\) returned a view")
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def assign_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole (unsharded) tensor into ``target``, keeping only this rank's part of a DTensor.
    Every rank must hold ``full``; nothing is communicated."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        full = full.to(target.device, target.dtype)
        try:
            part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        except TypeError:  # torch < 2.6: no src_data_rank; it scatters from rank 0 (same data, more traffic)
            part = distribute_tensor(full, target.device_mesh, target.placements)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(full.to(target.device, target.dtype))


def barrier() -> None:
    if is_distributed() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
