"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the DiT and the umT5 encoder, loaded shard by shard.

The official Wan code wraps with FSDP1 after every rank has read the whole checkpoint. Here each rank
builds the model on the meta device with its final dtypes (bf16 in practice), wraps it (every block its
own unit; the root unit holds the embeddings, the head and the step-size embedding), materialises the
empty shards on its device and copies in only its own rows of each sharded tensor. No rank ever holds
the whole model; host memory holds one tensor at a time (memory-mapped for ``.pt``/``.pth`` files, so
only this rank's rows are read from them).

The anchor injector (``spatial_adapter``) is not sharded: every rank keeps it whole, in float32, as the
reference does (it is applied after FSDP wrapping there). Parameters are stored in the dtype they are
loaded in, so no mixed-precision policy is needed and the unsharded forward sees exactly those values.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..errors import ConfigError
from ..loading.fp8 import dequantize
from ..loading.load import finish, load_from_source, open_weights, plan_for, recorded_step_size_conditioning

log = logging.getLogger("pixelwizard")

SHARDABLE = ("dit", "hr_dit", "t5")
KEEP_WHOLE = ("spatial_adapter",)  # submodules every rank keeps entire


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Wrap ``model`` in place: one FSDP unit per entry of ``model.blocks``, then the root (minus
    KEEP_WHOLE submodules). Works on a meta-device model (then call ``to_empty`` and fill it)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"{type(model).__name__} has no 'blocks' list to shard one block per FSDP unit")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    ignored = {p for name in KEEP_WHOLE if hasattr(model, name) for p in getattr(model, name).parameters()}
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
    return model


def load_sharded(
    path: str | Path,
    component: str,
    mesh: DeviceMesh,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    use_ema: bool = False,
) -> nn.Module:
    """Load ``component`` ('dit', 'hr_dit' or 't5') from ``path`` already sharded over ``mesh``.

    Key and shape checks are those of the ordinary loader (run before anything is read). The HR model is
    built as :func:`pixelwizard_core.loading.load_hr_dit` builds it: injector in float32, the step-size
    conditioning the file records.
    """
    if component not in SHARDABLE:
        raise ConfigError(f"FSDP sharding applies to {', '.join(SHARDABLE)}, not {component!r}")
    hr = component == "hr_dit"
    with open_weights(path, component, use_ema=use_ema) as source:
        model = load_from_source(
            source, component, dtype=dtype, device="meta",
            dtype_overrides={"spatial_adapter.": torch.float32} if hr else None,
            model_kwargs={"step_size_conditioning": recorded_step_size_conditioning(source)} if hr else None)
        shard_model(model, mesh)
        model.to_empty(device=torch.device(device))
        _fill_shards(model, source, component)
    finish(model)
    model.eval().requires_grad_(False)
    stats = shard_stats(model)
    log.info("sharded %s over %d ranks: this rank holds %.1f%% of the block parameters",
             component, mesh.size(), 100.0 * stats["block_local"] / max(stats["block_total"], 1))
    return model


def _fill_shards(model: nn.Module, source, component: str) -> None:
    plan = plan_for(source, component)
    position = {k: i for i, k in enumerate(source.infos)}
    for target, key in sorted(plan.tensors.items(), key=lambda kv: position[kv[1]]):  # file order
        destination = _tensor_of(model, target)
        local, rows = _local_rows(destination)
        tensor = source.read(key)
        if rows is not None:
            tensor = tensor[rows]
        if target in plan.weight_scales:
            scale = source.read(plan.weight_scales[target])
            if rows is not None and scale.numel() != 1:
                scale = scale.reshape(-1)[rows]
            tensor = dequantize(tensor, scale, local.dtype)
        with torch.no_grad():
            local.copy_(tensor.to(local.dtype))
        del tensor


def _tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        return module._parameters[leaf]
    return module._buffers[leaf]


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
    """This rank's storage of ``tensor`` and the rows of the full tensor it holds (None: all of it).

    FSDP2 shards dim 0 as ``torch.chunk`` does: ceil(rows / world) rows per rank, the last ranks fewer
    or none."""
    if not isinstance(tensor, DTensor):
        return tensor, None
    placement = tensor.placements[0]
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ConfigError(f"unexpected FSDP placement {placement} (dim-0 sharding expected)")
    local = tensor.to_local()
    mesh = tensor.device_mesh
    per_rank = math.ceil(tensor.shape[0] / mesh.size())
    start = min(mesh.get_local_rank() * per_rank, tensor.shape[0])
    return local, slice(start, start + local.shape[0])


def shard_stats(model: nn.Module) -> dict[str, int]:
    """Parameter counts: held by this rank and in the whole model, for the blocks and for everything."""
    stats = {"block_local": 0, "block_total": 0, "local": 0, "total": 0}
    for name, param in model.named_parameters():
        local = param.to_local().numel() if isinstance(param, DTensor) else param.numel()
        stats["local"] += local
        stats["total"] += param.numel()
        if name.startswith("blocks."):
            stats["block_local"] += local
            stats["block_total"] += param.numel()
    return stats
