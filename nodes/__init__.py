"""The PixelWizard ComfyUI nodes (classic node API). Each node is thin: inputs in, one library call, outputs out."""

from .anchors import (
    PixelWizardAnchorFromLatent,
    PixelWizardAnchorFromVideo,
    PixelWizardAnchorLoad,
    PixelWizardAnchorPreview,
    PixelWizardAnchorSampler,
    PixelWizardAnchorSave,
)
from .conditioning import PixelWizardTextEncode
from .decode import PixelWizardDecodeToVideo, PixelWizardTiledDecode
from .loaders import PixelWizardCheckpointLoader, PixelWizardWanLoader
from .lora import PixelWizardLoRA
from .multigpu import PixelWizardMultiGPU, PixelWizardPoolShutdown
from .sampling import PixelWizardHRSampler

from . import routes

try:  # inside ComfyUI: the pack's routes and its /free hook (routes.py)
    from server import PromptServer

    routes.register(PromptServer.instance)
except (ImportError, AttributeError):  # tests and scripts: no server
    pass

NODE_CLASS_MAPPINGS = {
    "PixelWizardWanLoader": PixelWizardWanLoader,
    "PixelWizardCheckpointLoader": PixelWizardCheckpointLoader,
    "PixelWizardLoRA": PixelWizardLoRA,
    "PixelWizardTextEncode": PixelWizardTextEncode,
    "PixelWizardAnchorSampler": PixelWizardAnchorSampler,
    "PixelWizardAnchorPreview": PixelWizardAnchorPreview,
    "PixelWizardAnchorSave": PixelWizardAnchorSave,
    "PixelWizardAnchorLoad": PixelWizardAnchorLoad,
    "PixelWizardAnchorFromLatent": PixelWizardAnchorFromLatent,
    "PixelWizardAnchorFromVideo": PixelWizardAnchorFromVideo,
    "PixelWizardHRSampler": PixelWizardHRSampler,
    "PixelWizardTiledDecode": PixelWizardTiledDecode,
    "PixelWizardDecodeToVideo": PixelWizardDecodeToVideo,
    "PixelWizardMultiGPU": PixelWizardMultiGPU,
    "PixelWizardPoolShutdown": PixelWizardPoolShutdown,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "PixelWizardWanLoader": "PixelWizard Wan2.2 Loader",
    "PixelWizardCheckpointLoader": "PixelWizard Checkpoint Loader",
    "PixelWizardLoRA": "PixelWizard LoRA",
    "PixelWizardTextEncode": "PixelWizard Text Encode",
    "PixelWizardAnchorSampler": "PixelWizard Anchor Sampler (LR)",
    "PixelWizardAnchorPreview": "PixelWizard Anchor Preview",
    "PixelWizardAnchorSave": "PixelWizard Anchor Save",
    "PixelWizardAnchorLoad": "PixelWizard Anchor Load",
    "PixelWizardAnchorFromLatent": "PixelWizard Anchor from Latent",
    "PixelWizardAnchorFromVideo": "PixelWizard Anchor from Video",
    "PixelWizardHRSampler": "PixelWizard HR Sampler (2K/4K)",
    "PixelWizardTiledDecode": "PixelWizard Tiled Decode",
    "PixelWizardDecodeToVideo": "PixelWizard Decode to Video",
    "PixelWizardMultiGPU": "PixelWizard Multi-GPU",
    "PixelWizardPoolShutdown": "PixelWizard Multi-GPU Shutdown",
}
