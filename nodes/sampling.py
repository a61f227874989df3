"""The HR shortcut sampler node: anchor + HR checkpoint + conditioning -> 2K/4K LATENT in 4 steps."""

from __future__ import annotations

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.pipeline.presets import HR_CFG, HR_PRESETS, StageSettings
from pixelwizard_core.sampling import solver_choices

from . import host
from .types import (
    CATEGORY,
    PW_ANCHOR,
    PW_CONDITIONING,
    PW_STAGE_MODEL,
    pool_input,
    to_comfy_latent,
)

CUSTOM = "custom"


def _preset_tooltip() -> str:
    sizes = "; ".join(f"{name}: {p.width}x{p.height}, shift {p.shift}" for name, p in HR_PRESETS.items())
    return f"{sizes}; {CUSTOM}: the values below"


class PixelWizardHRSampler:
    DESCRIPTION = ("The HR shortcut stage: samples 2K or 4K from pure noise in 4 steps, guided by the anchor in both "
                   "CFG branches. Returns a native LATENT (raw Wan2.2 latents) that VAE Decode also understands.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        two_k = HR_PRESETS["2k"]
        return {"required": {
            "hr_model": (PW_STAGE_MODEL, {"tooltip": "PixelWizard 2k/model.pt or 4k/model.pt (stage 'hr')"}),
            "anchor": (PW_ANCHOR, {"tooltip": "fixes layout and motion; its frame count is the video's"}),
            "conditioning": (PW_CONDITIONING, {"tooltip": "from PixelWizard Text Encode"}),
            "preset": ([*HR_PRESETS.names(), CUSTOM], {"default": "2k", "tooltip": _preset_tooltip()}),
            "width": ("INT", {"default": two_k.width, "min": 32, "max": 8192, "step": 32, "tooltip": "used with preset 'custom'"}),
            "height": ("INT", {"default": two_k.height, "min": 32, "max": 8192, "step": 32, "tooltip": "used with preset 'custom'"}),
            "steps": ("INT", {"default": two_k.steps, "min": 2, "max": 8, "tooltip": "shortcut steps (4)"}),
            "shift": ("FLOAT", {"default": two_k.shift, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": "used with preset 'custom'"}),
            "cfg": ("FLOAT", {"default": HR_CFG, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip": "guidance (5.0); 1 skips the negative pass"}),
            "seed": ("INT", {"default": 10000, "min": 0, "max": 2**63 - 1, "control_after_generate": True,
                             "tooltip": "the reference uses base_seed + 10000 for the first prompt"}),
            "solver": (list(solver_choices(hr=True)), {"default": "unipc", "tooltip": "unipc as the reference; shortcut is the paper's x + dt*v"}),
        }, "optional": pool_input("HR stage")}

    def sample(self, hr_model, anchor, conditioning, preset, width, height, steps, shift, cfg, seed, solver, pool=None):
        if hr_model.role != "hr":
            raise ConfigError("hr_model is an LR checkpoint; load 2k/model.pt or 4k/model.pt with stage 'hr'")
        if preset != CUSTOM:
            width, height, shift = HR_PRESETS[preset].width, HR_PRESETS[preset].height, HR_PRESETS[preset].shift
        settings = StageSettings(width, height, anchor.frames, steps, shift, cfg, solver)
        latent = host.stages(pool).hr_latent(hr_model, anchor, conditioning, settings, seed,
                                             host.control("HR", previews=True))
        return (to_comfy_latent(latent),)
