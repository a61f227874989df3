"""Anchor nodes: sample, preview, save, load, and make anchors from a LATENT or from video frames."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.pipeline.anchors import Anchor
from pixelwizard_core.pipeline.first_frame import encode_first_frame
from pixelwizard_core.pipeline.jobs import output_path
from pixelwizard_core.pipeline.presets import LR_DEFAULTS, StageSettings
from pixelwizard_core.pipeline.stages import anchor_from_video
from pixelwizard_core.sampling import solver_choices

from . import host
from .types import (
    CATEGORY,
    PW_ANCHOR,
    PW_CONDITIONING,
    PW_STAGE_MODEL,
    PW_WAN,
    from_comfy_latent,
    pool_input,
    to_comfy_latent,
)

ANCHOR_FOLDER = Path("pixelwizard") / "anchors"


def to_image(video: torch.Tensor) -> torch.Tensor:
    """VAE output [1, 3, F, H, W] in [-1, 1] -> ComfyUI IMAGE [F, H, W, 3] in 0..1."""
    return ((video[0].permute(1, 2, 3, 0).float() + 1) / 2).clamp(0, 1).cpu()


class PixelWizardAnchorSampler:
    DESCRIPTION = ("The LR anchor: 448x256, 121 frames, 50 steps. Cheap (3,472 tokens); it fixes layout and motion. "
                   "Uses the PixelWizard LR checkpoint when connected, else the Wan2.2 base DiT.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = (PW_ANCHOR, "LATENT")
    RETURN_NAMES = ("anchor", "latent")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        d = LR_DEFAULTS
        return {
            "required": {
                "wan": (PW_WAN, {"tooltip": "from PixelWizard Wan2.2 Loader (its DiT samples unless lr_model is given)"}),
                "conditioning": (PW_CONDITIONING, {"tooltip": "from PixelWizard Text Encode"}),
                "width": ("INT", {"default": d.width, "min": 32, "max": 4096, "step": 32, "tooltip": "anchor width (multiple of 32)"}),
                "height": ("INT", {"default": d.height, "min": 32, "max": 4096, "step": 32, "tooltip": "anchor height (multiple of 32)"}),
                "frames": ("INT", {"default": d.frames, "min": 1, "max": 1001, "step": 4, "tooltip": "4k+1 frames; the HR video has as many"}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 200, "tooltip": "the reference uses 50"}),
                "shift": ("FLOAT", {"default": d.shift, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": "flow shift (5.0)"}),
                "cfg": ("FLOAT", {"default": d.cfg, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip": "guidance scale; 1 skips the negative pass"}),
                "seed": ("INT", {"default": 100, "min": 0, "max": 2**63 - 1, "control_after_generate": True,
                                 "tooltip": "the reference uses base_seed + 100 for the first prompt"}),
                "solver": (list(solver_choices(hr=False)), {"default": "unipc", "tooltip": "unipc as the reference; euler for comparison"}),
            },
            "optional": {"lr_model": (PW_STAGE_MODEL, {"tooltip": "PixelWizard lr/model.pt; default: the Wan2.2 base DiT"}),
                         **pool_input("anchor stage"),
                         "start_image": ("IMAGE", {"tooltip": "image to video (TI2V): the video starts from this image, "
                                                              "resized to cover the anchor size and center-cropped"})},
        }

    def sample(self, wan, conditioning, width, height, frames, steps, shift, cfg, seed, solver, lr_model=None, pool=None,
               start_image=None):
        settings = StageSettings(width, height, frames, steps, shift, cfg, solver)
        handle = lr_model or wan.dit
        if handle.role != "lr":
            raise ConfigError("lr_model is an HR checkpoint; connect lr/model.pt (stage 'lr') or nothing")
        first = None
        if start_image is not None:
            with host.placed(wan.vae) as vae:
                first = encode_first_frame(vae, start_image[0], width, height)  # the batch's first image
        anchor = host.stages(pool).lr_anchor(handle, conditioning, settings, seed,
                                             host.control("anchor", previews=True), first_frame=first)
        return anchor, to_comfy_latent(anchor.latent)


class PixelWizardAnchorPreview:
    DESCRIPTION = "Decode the anchor to frames in seconds, to judge structure and motion before paying for the HR stage."
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"wan": (PW_WAN, {"tooltip": "its VAE decodes the anchor"}),
                             "anchor": (PW_ANCHOR, {"tooltip": "from the anchor sampler or Anchor Load"})}}

    def preview(self, wan, anchor):
        with host.placed(wan.vae) as vae:
            video = vae.decode(anchor.latent, on_frame=host.progress("anchor preview"))
        return (to_image(video),)


def _anchor_dirs() -> dict[str, Path]:
    return {"output": host.output_dir() / ANCHOR_FOLDER, "input": host.input_dir() / ANCHOR_FOLDER}


ANCHOR_SUFFIX = ".safetensors"


def anchor_choices() -> list[str]:
    """``output/<name>`` and ``input/<name>``, without the file suffix: ComfyUI's frontend takes any combo value
    ending in a model suffix for a model file and reports an anchor not saved yet as a missing model."""
    names = []
    for where, folder in _anchor_dirs().items():
        if folder.is_dir():
            names += [f"{where}/{p.stem}" for p in sorted(folder.glob(f"*{ANCHOR_SUFFIX}"))]
    return names


def anchor_file(choice: str) -> Path:
    """The file of a choice, with or without its suffix (workflows saved before the suffix was dropped)."""
    where, _, name = choice.partition("/")
    folder = _anchor_dirs().get(where)
    name = name if name.endswith(ANCHOR_SUFFIX) else name + ANCHOR_SUFFIX
    if folder is None or Path(name).name != name or not (folder / name).is_file():
        raise FileNotFoundError(f"anchor {choice!r} is not in input/ or output/{ANCHOR_FOLDER.as_posix()}; save one first")
    return folder / name


class PixelWizardAnchorSave:
    DESCRIPTION = "Save the anchor (latent + prompt, seed, size, steps...) as safetensors in output/pixelwizard/anchors."
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = (PW_ANCHOR,)
    RETURN_NAMES = ("anchor",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"anchor": (PW_ANCHOR, {"tooltip": "the anchor to keep"}),
                             "filename_prefix": ("STRING", {"default": "anchor", "tooltip": "file name; _N is added, nothing is overwritten"})}}

    def save(self, anchor, filename_prefix):
        prefix = Path(filename_prefix).name or "anchor"
        path = anchor.save(output_path(_anchor_dirs()["output"], f"{prefix}_seed{anchor.seed}", ".safetensors", overwrite=False))
        return {"ui": {"text": [f"output/{path.stem}"]}, "result": (anchor,)}  # as Anchor Load lists it


class PixelWizardAnchorLoad:
    DESCRIPTION = "Load a saved anchor from input/ or output/pixelwizard/anchors, e.g. the one picked from a batch."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PW_ANCHOR, "LATENT")
    RETURN_NAMES = ("anchor", "latent")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"anchor": (anchor_choices(), {"tooltip": "anchors saved by PixelWizard Anchor Save"})}}

    @classmethod
    def VALIDATE_INPUTS(cls, anchor):
        """Instead of ComfyUI's "value not in list": older workflows name the file with its suffix."""
        try:
            anchor_file(anchor)
        except FileNotFoundError as error:
            return str(error)
        return True

    @classmethod
    def IS_CHANGED(cls, anchor):
        try:
            return anchor_file(anchor).stat().st_mtime_ns
        except FileNotFoundError:
            return math.nan

    def load(self, anchor):
        loaded = Anchor.load(anchor_file(anchor))
        return {"ui": {"text": [f"{loaded.prompt[:80]} | seed {loaded.seed} | {loaded.width}x{loaded.height}, {loaded.frames} frames"]},
                "result": (loaded, to_comfy_latent(loaded.latent))}


class PixelWizardAnchorFromLatent:
    DESCRIPTION = "Use any Wan2.2 5B LATENT (e.g. from ComfyUI's own sampler) as the anchor of the HR stage."
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = (PW_ANCHOR,)
    RETURN_NAMES = ("anchor",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"latent": ("LATENT", {"tooltip": "a Wan2.2 5B video latent (48 channels)"}),
                             "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "kept as the anchor's description"})}}

    def convert(self, latent, prompt):
        return (Anchor.from_latent(from_comfy_latent(latent), model="latent", prompt=prompt),)


class PixelWizardAnchorFromVideo:
    DESCRIPTION = "Make an anchor from existing footage: frames are cut to 4k+1, resized to the anchor size and VAE-encoded."
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (PW_ANCHOR,)
    RETURN_NAMES = ("anchor",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "wan": (PW_WAN, {"tooltip": "its VAE encodes the frames"}),
            "frames": ("IMAGE", {"tooltip": "video frames, e.g. from Load Video"}),
            "width": ("INT", {"default": LR_DEFAULTS.width, "min": 32, "max": 4096, "step": 32, "tooltip": "anchor width (448 as the reference)"}),
            "height": ("INT", {"default": LR_DEFAULTS.height, "min": 32, "max": 4096, "step": 32, "tooltip": "anchor height (256 as the reference)"}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "kept as the anchor's description"}),
        }}

    def encode(self, wan, frames, width, height, prompt):
        with host.placed(wan.vae) as vae:
            return (anchor_from_video(vae, frames, width, height, prompt=prompt),)
