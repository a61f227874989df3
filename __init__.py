"""PixelWizard for ComfyUI: 2K/4K text-to-video on Wan2.2-TI2V-5B (https://arxiv.org/abs/2605.25801)."""

import sys
from pathlib import Path

# ComfyUI imports the pack by file path, so its library (pixelwizard_core, beside this file) is not importable
# unless the pack folder is on sys.path. Appended, not prepended: the pack's `nodes` must not shadow ComfyUI's.
_PACK_ROOT = str(Path(__file__).resolve().parent)
if _PACK_ROOT not in sys.path:
    sys.path.append(_PACK_ROOT)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
