"""PixelWizard for ComfyUI: 2K/4K text-to-video on Wan2.2-TI2V-5B (https://arxiv.org/abs/2605.25801)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
