"""A start image as the first frame of a video (TI2V-5B image-to-video, as the official ``WanTI2V.i2v``).

The image is VAE-encoded to one latent frame ``z``; with the mask that is 0 on latent frame 0 and 1
elsewhere, the sampler starts from ``(1 - mask) * z + mask * noise``, gives the tokens of frame 0 the
timestep 0 and all others the step's timestep (per-token timesteps), and puts ``z`` back after every
solver step. The model gets no extra input: TI2V-5B's image conditioning is only this.

The official code resizes with PIL's LANCZOS to cover the size, then center-crops; torch has no Lanczos
filter, so the cover resize here is bicubic with antialiasing (ComfyUI's native node uses bilinear), then
the same center crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from ..errors import ConfigError
from .presets import LATENT_CHANNELS, check_size

PATCH_HW = 2  # the DiT's patch is 1 x 2 x 2 latent pixels: one token per 2x2 of a latent frame


def cover_crop(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """An image [H, W, 3] in 0..1 resized to cover ``width`` x ``height`` and center-cropped to it, as a
    video [1, 3, 1, height, width] in [-1, 1]."""
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ConfigError(f"start image has shape {tuple(image.shape)}; expected [H, W, 3] (RGB)")
    ih, iw = image.shape[:2]
    scale = max(width / iw, height / ih)
    size = (max(height, round(ih * scale)), max(width, round(iw * scale)))
    pixels = rearrange(image.float(), "h w c -> 1 c h w")
    resized = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    cropped = resized[:, :, top:top + height, left:left + width].clamp(0, 1)
    return rearrange(cropped * 2 - 1, "1 c h w -> 1 c 1 h w")


def frame_mask(latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The official ``masks_like(..., zero=True)`` second mask: ones [C, T, h, w] with latent frame 0 zero."""
    mask = torch.ones(latent_shape, dtype=torch.float32)
    mask[:, 0] = 0
    return mask


@dataclass(frozen=True)
class FirstFrame:
    """A kept first latent frame ``latent`` [1, 48, 1, h, w] (normalised, as the VAE encodes)."""

    latent: torch.Tensor

    def check(self, latent_shape: tuple[int, ...]) -> None:
        want = (1, LATENT_CHANNELS, 1, *latent_shape[-2:])
        if tuple(self.latent.shape) != want:
            raise ConfigError(f"start image latent has shape {tuple(self.latent.shape)}; this stage needs {want}: "
                              "encode the image at the stage's size")

    def constraint(self, device: torch.device):
        """``x -> (1 - mask) * z + mask * x`` on ``device`` (the loop's constraint)."""
        z = self.latent.to(device=device, dtype=torch.float32)

        def keep(x: torch.Tensor) -> torch.Tensor:
            mask = frame_mask(tuple(x.shape[1:])).to(x.device)
            return (1.0 - mask) * z + mask * x

        return keep

    @staticmethod
    def token_timesteps(t: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Per-token timesteps [1, L] for scalar step ``t``: 0 for the tokens of latent frame 0, ``t`` for
        the others, in the DiT's frame-height-width token order (official: ``mask2[0][0][:, ::2, ::2] * t``)."""
        mask = frame_mask(tuple(latent_shape))[0, :, ::PATCH_HW, ::PATCH_HW].to(t.device)
        return (mask * t).flatten().unsqueeze(0)


def encode_first_frame(vae, image: torch.Tensor, width: int, height: int) -> FirstFrame:
    """A start image [H, W, 3] in 0..1, covered and cropped to ``width`` x ``height`` and VAE-encoded (the
    VAE on its device): the first frame of a stage at that size."""
    check_size(width, height)
    video = cover_crop(image, width, height)
    return FirstFrame(vae.encode(video.to(vae.device)).cpu())
