"""Training checkpoints: safetensors with metadata, written atomically, resumable.

Layout of ``<output_dir>/checkpoint_<step:06d>/``:

- ``model.safetensors``: the full float32 weights (our key names, loadable with ``load_hr_dit``); metadata
  ``step_size_conditioning`` (so sampling builds the conditioning the model was trained with), ``step``,
  ``objective`` (the shortcut options) and ``kind``;
- ``ema.safetensors``: the EMA weights, same keys and metadata (once EMA has started);
- ``state_rank<r>.safetensors``: each rank's optimiser moments (its FSDP shard), its random generator and
  the objective's running state; resuming them needs the same number of ranks;
- ``model.pt`` on request: the reference's layout ``{"generator": {"model.<key>": ...}, "generator_ema":
  ..., "step_size_conditioning": name}`` (torch.save of tensors and strings only).

A checkpoint is written into a hidden ``.checkpoint_<step>.partial`` folder and renamed when every rank
has finished, so a crash never leaves a half-written checkpoint that looks complete; at most the steps
since the last checkpoint are lost.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, WeightFormatError
from ..io.latents import load_tensor_file, save_tensor_file
from ..models.hr import STEP_SIZE_CONDITIONING_KEY
from .sharding import assign_full, barrier, full_tensor, local_tensor

log = logging.getLogger("pixelwizard")

_NAME = re.compile(r"^checkpoint_(\d{6,})$")
MODEL_FILE, EMA_FILE, PT_FILE = "model.safetensors", "ema.safetensors", "model.pt"
WEIGHTS_KIND = "pixelwizard.training_weights"
STATE_KIND = "pixelwizard.training_state"


def state_file(rank: int) -> str:
    return f"state_rank{rank:05d}.safetensors"


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"checkpoint_{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / MODEL_FILE).is_file()
             and (p / state_file(0)).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if not match:
        raise ConfigError(f"{path} is not a training checkpoint folder (checkpoint_NNNNNN)")
    return int(match.group(1))


@dataclass
class TrainingState:
    """What one rank saves besides the weights."""

    step: int
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    objective_state: dict[str, float]


# ---------------------------------------------------------------------------------------------- saving

def _gather(named: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU on the main rank (every rank takes part in the gathers)."""
    out = {}
    for name, tensor in named.items():
        whole = full_tensor(tensor.detach())
        if keep:
            out[name] = whole.float().cpu()
    return out


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                out[f"optimizer/{name}/{key}"] = local_tensor(value).detach().cpu()
    return out


def save_checkpoint(root: str | Path, model: nn.Module, ema_shadow: dict[str, torch.Tensor] | None,
                    state: TrainingState, *, rank: int, world_size: int, metadata: dict[str, Any],
                    export_pt: bool = False, keep_last: int = 0) -> Path:
    """Write the checkpoint of ``state.step`` (collective: call on every rank). Returns its folder."""
    root = Path(root)
    final = checkpoint_path(root, state.step)
    partial = root / f".{final.name}.partial"
    is_main = rank == 0
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    weights = _gather(model.state_dict(), is_main)
    ema = _gather(_full_ema(model, ema_shadow), is_main) if ema_shadow is not None else None
    meta = {**metadata, "step": state.step}
    if is_main:
        save_tensor_file(partial / MODEL_FILE, weights, meta, kind=WEIGHTS_KIND)
        if ema is not None:
            save_tensor_file(partial / EMA_FILE, ema, {**meta, "ema": True}, kind=WEIGHTS_KIND)
        if export_pt:
            export_reference_pt(partial / PT_FILE, weights, ema, str(metadata.get(STEP_SIZE_CONDITIONING_KEY, "")))
    tensors = _optimizer_tensors(model, state.optimizer)
    tensors["rng"] = state.generator.get_state()
    save_tensor_file(partial / state_file(rank), tensors,
                     {"step": state.step, "rank": rank, "world_size": world_size,
                      "objective_state": state.objective_state,
                      "optimizer_groups": _group_settings(state.optimizer)}, kind=STATE_KIND)
    barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def _full_ema(model: nn.Module, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every state-dict entry, with the EMA shadow where there is one (frozen weights as they are)."""
    return {name: shadow.get(name, tensor) for name, tensor in model.state_dict().items()}


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    keep = ("lr", "betas", "eps", "weight_decay")
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k in keep}
            for g in optimizer.param_groups]


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def export_reference_pt(path: Path, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                        conditioning: str) -> Path:
    """The reference trainer's ``model.pt`` layout (plus the conditioning name as a top-level string,
    which the reference's loader ignores). Written to a temporary name, then renamed."""
    content: dict[str, Any] = {"generator": {f"model.{k}": v for k, v in weights.items()}}
    if ema is not None:
        content["generator_ema"] = {f"model.{k}": v for k, v in ema.items()}
    if conditioning:
        content[STEP_SIZE_CONDITIONING_KEY] = conditioning
    temporary = path.with_name(f".{path.name}.partial")
    torch.save(content, temporary)
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------- loading

def read_weights_into(path: Path, targets: dict[str, torch.Tensor]) -> dict[str, str]:
    """Copy a weights file tensor by tensor into ``targets`` (our parameters / shadows, sharded or not);
    the file must hold exactly those names and shapes. Returns the file's raw metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing, extra = sorted(set(targets) - names), sorted(names - set(targets))
        if missing or extra:
            raise WeightFormatError(f"{path} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, target in targets.items():
            value = f.get_tensor(name)
            if tuple(value.shape) != tuple(target.shape):
                raise WeightFormatError(f"{path}: {name} has shape {list(value.shape)}, the model {list(target.shape)}")
            assign_full(target, value)
        return dict(f.metadata() or {})


def load_training_state(folder: Path, model: nn.Module, state: TrainingState, *, rank: int,
                        world_size: int) -> dict[str, Any]:
    """Restore this rank's optimiser moments, generator and objective state; returns the metadata."""
    path = folder / state_file(rank)
    tensors, meta = load_tensor_file(path, kind=STATE_KIND)
    if meta.get("world_size") != world_size:
        raise ConfigError(
            f"{folder} was written by {meta.get('world_size')} process(es); resuming its optimiser state needs "
            f"the same number, not {world_size}. Start a new run from {folder / MODEL_FILE} with --init instead.")
    state.generator.set_state(tensors.pop("rng"))
    for name, param in model.named_parameters():
        entries = {key.rsplit("/", 1)[1]: value for key, value in tensors.items()
                   if key.startswith(f"optimizer/{name}/")}
        if entries:
            state.optimizer.state[param] = {key: _like_state(param, key, value) for key, value in entries.items()}
    state.objective_state = dict(meta.get("objective_state") or {})
    state.step = int(meta["step"])
    return meta


def _like_state(param: torch.Tensor, key: str, saved: torch.Tensor) -> torch.Tensor:
    """An optimiser state tensor laid out like ``param`` (a DTensor shard under FSDP) holding ``saved``."""
    if saved.dim() == 0 or key == "step":
        return saved.clone()
    value = torch.zeros_like(param, dtype=saved.dtype)
    local_tensor(value).copy_(saved)
    return value


def read_metadata(path: Path) -> dict[str, Any]:
    """JSON-decoded user metadata of a checkpoint file, without reading its tensors."""
    from ..loading.readers import read_safetensors_header

    _, raw = read_safetensors_header(path)
    out = {}
    for key, text in raw.items():
        if key.startswith("pixelwizard."):
            continue
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out
