"""Text encode node: prompt and negative prompt -> PW conditioning (or reuse ComfyUI's own CONDITIONING)."""

from __future__ import annotations

from pixelwizard_core.pipeline.presets import WAN_NEGATIVE_PROMPT
from pixelwizard_core.pipeline.text import TextConditioning

from . import host
from .types import CATEGORY, PW_CONDITIONING, PW_WAN, context_from_native, pool_input


class PixelWizardTextEncode:
    DESCRIPTION = ("Encode the prompt and negative prompt with umT5 for both PixelWizard stages. Connect ComfyUI's own "
                   "CONDITIONING instead to reuse an existing Wan text encoder node.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (PW_CONDITIONING,)
    RETURN_NAMES = ("conditioning",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "wan": (PW_WAN, {"tooltip": "from PixelWizard Wan2.2 Loader (its text encoder is used)"}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "what the video shows"}),
                "negative_prompt": ("STRING", {"multiline": True, "default": WAN_NEGATIVE_PROMPT,
                                               "tooltip": "Wan's default negative prompt; empty means the same"}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "native umT5 conditioning; replaces the prompt"}),
                "negative": ("CONDITIONING", {"tooltip": "native umT5 conditioning; replaces the negative prompt"}),
                **pool_input("text encoder"),
            },
        }

    def encode(self, wan, prompt, negative_prompt, positive=None, negative=None, pool=None):
        negative_prompt = negative_prompt.strip() or WAN_NEGATIVE_PROMPT
        if positive is not None and negative is not None:
            return (TextConditioning(context_from_native(positive), context_from_native(negative), prompt, negative_prompt),)
        text = host.stages(pool).encode_text(wan.text, prompt, negative_prompt, host.control("text"))
        if positive is not None:
            text.positive = context_from_native(positive)
        if negative is not None:
            text.negative = context_from_native(negative)
        return (text,)
