"""The LoRA node: a LoRA file from ComfyUI's ``loras`` folder added to the DiT handles passing through.

Handles stay lazy: the node only checks the file's keys and appends (file, strength) to the handle; the
model store merges the LoRAs when a sampler places the DiT and never reloads the base for them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.loading.lora import LORA_FOLDER, lora_ref
from pixelwizard_core.pipeline.handles import ModelHandle

from . import host
from .types import CATEGORY, PW_STAGE_MODEL, PW_WAN

log = logging.getLogger("pixelwizard")

STRENGTH = {"min": -10.0, "max": 10.0, "step": 0.01}
HR_TOOLTIP = ("strength on a PixelWizard HR model (stage 'hr') connected to 'model'; 0 leaves it as it is. LoRAs are "
              "trained for the Wan2.2 base model: on the HR model (a fine-tune of it) the effect is untested")


class PixelWizardLoRA:
    DESCRIPTION = ("Add a LoRA for the Wan2.2-TI2V-5B base model to the DiT of the Wan2.2 loader (the anchor stage) "
                   "and/or of a PixelWizard checkpoint. Chain several; the base loads once, and changing a LoRA or "
                   "its strength only re-merges it. LoRAs are trained for the base model: the HR model gets one only "
                   "with a non-zero hr_strength.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (PW_WAN, PW_STAGE_MODEL)
    RETURN_NAMES = ("wan", "model")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lora_name": (host.model_files(LORA_FOLDER), {"tooltip": "a Wan2.2-5B LoRA (models/loras)"}),
                "strength": ("FLOAT", {"default": 1.0, **STRENGTH, "tooltip": "on the base DiT of 'wan' and on an "
                                       "LR checkpoint connected to 'model'; 1.0 = as trained, 0 = off"}),
                "hr_strength": ("FLOAT", {"default": 0.0, **STRENGTH, "tooltip": HR_TOOLTIP}),
            },
            "optional": {
                "wan": (PW_WAN, {"tooltip": "from PixelWizard Wan2.2 Loader (or another LoRA node): its DiT gets the LoRA"}),
                "model": (PW_STAGE_MODEL, {"tooltip": "from PixelWizard Checkpoint Loader (or another LoRA node)"}),
            },
        }

    def apply(self, lora_name, strength, hr_strength, wan=None, model=None):
        if wan is None and model is None:
            raise ConfigError("PixelWizard LoRA: connect 'wan' (Wan2.2 Loader) and/or 'model' (Checkpoint Loader)")
        path = host.model_path(LORA_FOLDER, lora_name)
        if wan is not None:
            if wan.dit is None:
                raise ConfigError("PixelWizard LoRA: this 'wan' input carries no DiT to apply the LoRA to")
            wan = dataclasses.replace(wan, dit=_with_lora(wan.dit, path, strength))
        if model is not None:
            model = _with_lora(model, path, hr_strength if model.role == "hr" else strength)
        return wan, model


def _with_lora(handle: ModelHandle, path: Path, strength: float) -> ModelHandle:
    """``handle`` with the LoRA appended (checked now: its keys must name modules of the 5B DiT)."""
    if handle.role == "hr" and strength == 0:
        log.warning("PixelWizard LoRA: %s not applied to the HR model (hr_strength is 0)", path.name)
        return handle
    return handle.with_lora(lora_ref(path, strength))
