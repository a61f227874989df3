"""Decode nodes: tiled, cosine-blended VAE decode to IMAGE frames, or streamed straight into an mp4."""

from __future__ import annotations

import torch

from pixelwizard_core.io.video import VideoWriter
from pixelwizard_core.pipeline.jobs import output_path
from pixelwizard_core.pipeline.engine import DecodeSettings
from pixelwizard_core.pipeline.tile_plan import PATCH_DIMS
from pixelwizard_core.pipeline.tiled_decode import BLEND_MODES

from . import host
from .anchors import to_image
from .types import CATEGORY, PW_WAN, from_comfy_latent, pool_input


def _decode_inputs() -> dict:
    return {
        "wan": (PW_WAN, {"tooltip": "its VAE decodes"}),
        "latent": ("LATENT", {"tooltip": "Wan2.2 5B latent, e.g. from PixelWizard HR Sampler"}),
        "num_patches": ("INT", {"default": 3, "min": 0, "max": 16,
                                "tooltip": "tiles per axis: 3 for 2K, 4 for 4K (reference); 0: as few as fit the GPU's free memory"}),
        "patch_dim": (list(PATCH_DIMS), {"default": "w", "tooltip": PATCH_DIMS.choices_text()}),
        "overlap": ("INT", {"default": 3, "min": 0, "max": 32, "tooltip": "latent columns added on each inner tile side"}),
        "blend": (list(BLEND_MODES), {"default": "cosine", "tooltip": BLEND_MODES.choices_text()}),
    }


def _stream(wan, latent: dict, num_patches: int, patch_dim: str, overlap: int, blend: str, order: str, pool=None):
    """Decoded chunks [1, 3, n, H, W] in order, here (the VAE on the device only while this runs) or on the
    pool's workers, in either order: "frame" streams chunks of 1 then 4 frames (every tile's cache on the
    device, or each worker's share of them); "tile" decodes one tile at a time and the whole video is
    blended in RAM."""
    settings = DecodeSettings(num_patches=num_patches, patch_dim=patch_dim, overlap=overlap, blend=blend, order=order)
    return host.stages(pool).decode_stream(wan.vae, from_comfy_latent(latent), settings, host.control("decode"))


class PixelWizardTiledDecode:
    DESCRIPTION = ("Decode a 2K/4K latent in overlapping tiles blended with a cosine ramp, to IMAGE frames. "
                   "At 4K prefer 'Decode to Video': 121 frames as IMAGE take about 12 GB of RAM.")
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": _decode_inputs(), "optional": pool_input("decode (tiles split over the GPUs)")}

    def decode(self, wan, latent, num_patches, patch_dim, overlap, blend, pool=None):
        chunks = [to_image(chunk) for chunk in _stream(wan, latent, num_patches, patch_dim, overlap, blend, "tile", pool)]
        return (torch.cat(chunks),)


class PixelWizardDecodeToVideo:
    DESCRIPTION = ("The tiled decode streamed frame by frame into an mp4 in the output folder, so a 4K video never has "
                   "to fit in RAM. Returns a VIDEO.")
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    OUTPUT_NODE = True
    RETURN_TYPES = ("VIDEO",)
    RETURN_NAMES = ("video",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        inputs = _decode_inputs()
        inputs.update({
            "filename_prefix": ("STRING", {"default": "pixelwizard/video", "tooltip": "relative to the output folder; _N is added"}),
            "fps": ("INT", {"default": 24, "min": 1, "max": 120, "tooltip": "Wan2.2 generates 24 fps motion"}),
            "crf": ("INT", {"default": 10, "min": 0, "max": 51, "tooltip": "H.264 quality: 0 best .. 51 worst; 10 = reference quality"}),
        })
        return {"required": inputs, "optional": pool_input("decode (tiles split over the GPUs)")}

    def decode(self, wan, latent, num_patches, patch_dim, overlap, blend, filename_prefix, fps, crf, pool=None):
        target = host.output_dir() / filename_prefix
        path = output_path(target.parent, target.name, ".mp4", overwrite=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with VideoWriter(path, fps=fps, crf=crf) as writer:
            for chunk in _stream(wan, latent, num_patches, patch_dim, overlap, blend, "frame", pool):
                writer.append(chunk)
        relative = path.relative_to(host.output_dir())
        return {"ui": {"text": [str(relative)]}, "result": (host.video_output(path),)}
