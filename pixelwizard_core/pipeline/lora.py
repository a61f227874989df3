"""LoRAs on a loaded DiT: merged into its weights for as long as the same set is asked for, then restored.

The model store (:mod:`.store`) calls :func:`sync_loras` each time it places a DiT for a stage, with the
LoRAs of the handle (``ModelHandle.loras``). The base is loaded once: the store's key leaves the LoRAs out,
so changing a LoRA or its strength re-merges the loaded model and never reloads it.

Why merged, and kept merged: a merged weight costs nothing per step (no extra matmuls, compiled blocks
keep their graphs), and the set a graph or a batch uses rarely changes between stages, so the merge is
paid once per change of the set (one ``up @ down`` per adapted weight, computed on the stage's device),
not once per stage. The first merge copies each weight it changes to host memory (what ComfyUI's model
patcher does too) and a change of set writes those copies back: bit for bit the base again, whatever the
rounding of the merge was. Cost: host memory of the adapted weights' size while a LoRA is applied.

Weights that cannot take a merged update (float8-stored Linears, quantized ones) get a runtime delta
instead (:mod:`..models.lora`): their LoRA factors run beside them, registered under the model's
``lora_deltas`` so they move with its weights (offload, block swap, ComfyUI's model manager).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import ConfigError, WeightFormatError
from ..loading.lora import LoraRef, LoraTerm, as_refs, read_lora
from ..models.lora import LowRankDelta, attach_delta, detach_delta
from ..models.quantized import QuantizedWeight
from .placement import module_of

log = logging.getLogger("pixelwizard")

DELTAS = "lora_deltas"  # the child of a model holding its runtime deltas (so they move with it)
_MERGEABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class _Applied:
    """What :func:`sync_loras` did to one model, so :func:`remove_loras` can undo it exactly."""

    loras: tuple[LoraRef, ...]
    backups: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> its base value (host)
    layers: list[nn.Module] = field(default_factory=list)  # layers with a runtime delta


_applied: "weakref.WeakKeyDictionary[nn.Module, _Applied]" = weakref.WeakKeyDictionary()


def active(loras: Iterable[tuple]) -> tuple[LoraRef, ...]:
    """The LoRAs that change something: strength 0 is the base bit for bit, so it is left out."""
    return tuple(lora for lora in as_refs(loras) if lora.strength != 0)


def applied_loras(model: object) -> tuple[LoraRef, ...]:
    """The LoRAs merged into ``model`` now (empty: its base weights)."""
    try:
        state = _applied.get(module_of(model))
    except TypeError:  # not weakly referenceable (a stand-in model in tests): never had LoRAs
        return ()
    return state.loras if state else ()


def sync_loras(model: object, loras: Iterable[tuple], device: torch.device | str, *, sharded: bool = False) -> None:
    """Make ``model`` the base plus exactly ``loras`` (nothing to do when it already is); the updates are
    computed on ``device``. A failure leaves the base model."""
    wanted = active(loras)
    if applied_loras(model) == wanted:
        return
    if wanted and sharded:
        raise ConfigError("LoRAs on a DiT sharded with FSDP are not supported yet: turn off DiT FSDP "
                          "(dit_fsdp) or remove the LoRAs")
    remove_loras(model)
    if wanted:
        _apply(module_of(model), wanted, torch.device(device))


def remove_loras(model: object) -> None:
    """Restore ``model``'s base weights bit for bit and drop its runtime deltas (no LoRA: nothing)."""
    module = module_of(model)
    state = _applied.pop(module, None)
    if state is None:
        return
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, saved in state.backups.items():
            params[name].data.copy_(saved)
    for layer in state.layers:
        detach_delta(layer)
    if DELTAS in module._modules:
        delattr(module, DELTAS)
    log.info("LoRAs removed: %s", ", ".join(lora.describe() for lora in state.loras))


def _apply(module: nn.Module, loras: tuple[LoraRef, ...], device: torch.device) -> None:
    params = dict(module.named_parameters())
    updates = _updates(loras, params, functools.partial(_logical_shape, module))
    state = _applied[module] = _Applied(loras)  # first, so a failure part way is undone
    try:
        with torch.no_grad():
            for name, terms in updates.items():
                if _mergeable(params[name]):
                    _merge(params[name], name, terms, device, state)
                else:
                    _attach(module, name, terms, state)
    except BaseException:
        remove_loras(module)
        raise
    merged, runtime = len(state.backups), len(state.layers)
    log.info("LoRAs applied: %s (%d weights merged%s)", ", ".join(lora.describe() for lora in loras), merged,
             f", {runtime} as runtime deltas" if runtime else "")


def _logical_shape(module: nn.Module, name: str) -> torch.Size:
    """The shape a parameter has as a weight: a GGUF-quantized Linear stores its blocks as raw bytes (e.g.
    [out, in / 32 * 34] for Q8_0) and knows the [out, in] it stands for."""
    layer_name, _, kind = name.rpartition(".")
    layer = module.get_submodule(layer_name)
    if kind == "weight" and isinstance(layer, QuantizedWeight):
        return torch.Size(layer.weight_shape)
    return getattr(layer, kind).shape


def _updates(loras: tuple[LoraRef, ...], params: dict[str, nn.Parameter],
             shape_of: Callable[[str], torch.Size]) -> dict[str, list[tuple[LoraTerm, float]]]:
    """Parameter -> [(term, strength)] over every LoRA, each checked against the weight's (logical) shape."""
    updates: dict[str, list[tuple[LoraTerm, float]]] = {}
    for lora in loras:
        for term in read_lora(lora.path, params):
            shape = shape_of(term.target)
            if not term.fits(shape):
                raise WeightFormatError(
                    f"{lora.name}: {term.target} is {list(shape)} in this model, but the LoRA gives "
                    f"{term.describe_shape()}: it was made for another model (the 5B DiT is 3072 wide; "
                    "Wan 14B LoRAs are 5120 wide)")
            updates.setdefault(term.target, []).append((term, lora.strength))
    return updates


def _mergeable(param: torch.Tensor) -> bool:
    return type(param.data) is torch.Tensor and param.dtype in _MERGEABLE


def _merge(param: nn.Parameter, name: str, terms: list[tuple[LoraTerm, float]], device: torch.device,
           state: _Applied) -> None:
    """W <- W + sum of the updates, added in float32 and rounded once to W's dtype."""
    delta = None
    for term, strength in terms:
        update = term.delta(strength, device, param.shape)
        delta = update if delta is None else delta + update
    state.backups[name] = param.detach().to("cpu", copy=True)
    param.data.copy_((param.detach().to(device, torch.float32) + delta).to(param.dtype))


def _attach(module: nn.Module, name: str, terms: list[tuple[LoraTerm, float]], state: _Applied) -> None:
    """One runtime delta for a layer whose weight cannot be merged: every LoRA's factors side by side
    (their scales folded into ``up``), full diffs summed."""
    layer_name, _, kind = name.rpartition(".")
    layer = module.get_submodule(layer_name)
    if kind != "weight" or not isinstance(layer, nn.Linear):
        raise ConfigError(f"{name} is stored as {_param_kind(layer, kind)} and is not a Linear weight: a LoRA update "
                          "cannot be merged into it nor run beside it; load the model in bf16 to use this LoRA")
    weight = getattr(layer, kind)
    pairs = [(t, s) for t, s in terms if t.diff is None]
    diffs = [t.delta(s, weight.device, _logical_shape(module, name)) for t, s in terms if t.diff is not None]
    down = torch.cat([t.down.flatten(1).float() for t, _ in pairs]) if pairs else None
    up = torch.cat([t.up.flatten(1).float() * (s * t.scale) for t, s in pairs], dim=1) if pairs else None
    diff = sum(diffs[1:], diffs[0]) if diffs else None
    dtype = getattr(layer, "compute_dtype", torch.bfloat16)
    delta = LowRankDelta(down, up, diff, dtype).to(weight.device)
    if DELTAS not in module._modules:
        module.add_module(DELTAS, nn.ModuleList())
    module._modules[DELTAS].append(delta)
    attach_delta(layer, delta)
    state.layers.append(layer)


def _param_kind(layer: nn.Module, kind: str) -> str:
    tensor = getattr(layer, kind, None)
    return f"{type(tensor).__name__} {getattr(tensor, 'dtype', '?')}"
