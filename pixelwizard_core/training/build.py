"""The HR model to fine-tune, built from an HR checkpoint or from the base Wan2.2 DiT.

The model is built on the meta device, optionally wrapped with FSDP (so no rank ever holds the whole
float32 model), materialised on the training device and filled tensor by tensor from the file, in
float32 (master weights). Starting from the base DiT, the step-size conditioning and the anchor
injector are new: they get their own initialisation, with the last layers of the dt MLP, the injector's
dt projection and the injector's output layer at zero (the reference's training init), so the new
model starts as the base model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..loading import inspect_weights, load_dit, load_hr_dit
from ..loading.fp8 import dequantize
from ..loading.load import open_weights, plan_for, recorded_step_size_conditioning
from ..models.hr import STEP_SIZE_CONDITIONINGS, AnchorInjector, WanHRDiT
from .sharding import assign_full, enable_activation_checkpointing, shard_model

log = logging.getLogger("pixelwizard")
TRAINABLE = ("all", "conditioning")
NEW_HR_PARTS = ("dt_embedding.", "spatial_adapter.")


def checkpoint_kind(path: str | Path) -> str:
    """'hr_dit' or 'dit' for a file training can start from; ConfigError otherwise."""
    info = inspect_weights(path, component="hr_dit")
    if info.component == "dit":
        return "dit"
    if info.component != "hr_dit" or info.problem:
        raise ConfigError(f"{path} cannot start training: {info.problem or f'it holds {info.component!r}'}; "
                          "pass a PixelWizard HR checkpoint or the base Wan2.2-TI2V-5B DiT with --init")
    return "hr_dit"


def choose_conditioning(path: str | Path, kind: str, requested: str | None) -> str:
    """The conditioning to train: the one asked for, else the one the checkpoint was trained with."""
    recorded = "sinusoidal"
    if kind == "hr_dit":
        with open_weights(path, "hr_dit") as source:
            recorded = recorded_step_size_conditioning(source)
    name = requested or recorded
    if name not in STEP_SIZE_CONDITIONINGS:
        raise ConfigError(f"unknown step-size conditioning {name!r}; registered: {', '.join(sorted(STEP_SIZE_CONDITIONINGS))}")
    if kind == "hr_dit" and name != recorded:
        log.warning("%s was trained with step-size conditioning %r; fine-tuning it with %r (same layers, new "
                    "meaning: expect the dt embedding to relearn)", path, recorded, name)
    return name


def build_training_model(path: str | Path, *, step_size_conditioning: str | None = None,
                         device: torch.device | str = "cpu", shard: bool = False, precision: str = "fp32",
                         activation_checkpointing: bool = False, trainable: str = "all",
                         seed: int = 0) -> WanHRDiT:
    """A trainable ``WanHRDiT`` (float32 weights) on ``device`` from the checkpoint at ``path``."""
    if trainable not in TRAINABLE:
        raise ConfigError(f"trainable {trainable!r}: choose one of {', '.join(TRAINABLE)}")
    kind = checkpoint_kind(path)
    name = choose_conditioning(path, kind, step_size_conditioning)
    if kind == "hr_dit":
        model = load_hr_dit(path, device="meta", dtype="fp32", step_size_conditioning=name)
    else:
        config = load_dit(path, device="meta", dtype="fp32").config
        with torch.device("meta"):
            model = WanHRDiT(config, step_size_conditioning=name)
    model.train().requires_grad_(True)
    if trainable == "conditioning":  # the reference without --trainable_backbone: dt MLP and injector only
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.startswith(NEW_HR_PARTS))
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if shard:
        shard_model(model, precision)
    model.to_empty(device=device)
    _fill_from_file(model, path, kind)
    if kind == "dit":
        _initialise_new_parts(model, name, seed)
    return model


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _fill_from_file(model: nn.Module, path: str | Path, kind: str) -> None:
    """Copy every weight the file has into the (possibly sharded) model, one tensor at a time."""
    targets = _targets(model)
    with open_weights(path, kind) as source:
        plan = plan_for(source, kind)
        for name, key in plan.tensors.items():
            tensor = source.read(key)
            if name in plan.weight_scales:
                tensor = dequantize(tensor, source.read(plan.weight_scales[name]), torch.float32)
            assign_full(targets[name], tensor.float())
    missing = [n for n in targets if n not in plan.tensors and not (kind == "dit" and n.startswith(NEW_HR_PARTS))]
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} weights of the model, e.g. {missing[:3]}")


def _initialise_new_parts(model: WanHRDiT, name: str, seed: int) -> None:
    """Fresh dt conditioning and injector (built on the CPU with a fixed seed, copied in)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = {"dt_embedding": STEP_SIZE_CONDITIONINGS[name](model.config),
                 "spatial_adapter": AnchorInjector(model.config)}
    output = next(iter(fresh["spatial_adapter"].zero_layers.values()))
    nn.init.zeros_(output.weight)  # the trainer's injector starts as a no-op (inference code does not re-zero)
    nn.init.zeros_(output.bias)
    targets = _targets(model)
    for prefix, module in fresh.items():
        for key, value in module.state_dict().items():
            assign_full(targets[f"{prefix}.{key}"], value)
    log.info("new step-size conditioning %r and anchor injector initialised (seed %d)", name, seed)
